"""Interactive segmentation: what a click costs, alone and with 16 annotators at once.

    .venv/bin/python perf/clicks.py --model-repository var/model_repository

Starts a server on the repository (its default variant, `sam`) and measures,
in one run, over gRPC:

1. per click: a 1-point request on an image the server has encoded before
   (decoder only) vs the same request on an image it has never seen (the full
   pipeline), medians and their ratio, and the decoder's own compute time per
   click from Triton's statistics;
2. 16 concurrent clickers on 4 cached images, each clicking as an annotator
   does (one request after the other), for a fixed number of clicks:
   a. every click a 1-point request;
   b. mixed prompt kinds: a click with multimask, then a second point, then a
      refinement feeding its previous answer's low-res logits back, then a box
      with a point (a cycle of four);
   throughput, p50 / p95 latency, and decoder executions vs inferences (the
   cross-request batching at work).

Prints a table and writes perf/results/clicks.csv (machine named per row).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from samtriton import spec
from samtriton.client import AsyncSamClient, SamClient
from samtriton.serving.pipeline import repository_names, repository_parameters

sys.path.insert(0, str(Path(__file__).parent))
from latency import HEIGHT, RESULTS, WIDTH, delta, jpeg, machine, model_stats, serving  # noqa: E402

def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def click_at(rng) -> list[float]:
    return [float(rng.uniform(20, WIDTH - 20)), float(rng.uniform(20, HEIGHT - 20))]


def per_click(url: str, decoder: str, clicks: int, new_images: int, rng) -> dict:
    """1-point requests on a cached image vs on new images, sequential."""
    cached_image = jpeg(1000)
    with SamClient(url) as client:
        client.segment(jpeg(999), points=[click_at(rng)])  # warm-up: one-off costs of first calls
        client.encode(cached_image)
        before = model_stats(url, decoder)
        cached = []
        for _ in range(clicks):
            started = time.perf_counter()
            client.segment(cached_image, points=[click_at(rng)])
            cached.append((time.perf_counter() - started) * 1000)
        time.sleep(0.2)  # Triton records the last request's statistics just after answering
        dec = delta(model_stats(url, decoder), before)
        new = []
        for seed in range(new_images):
            image = jpeg(2000 + seed)
            started = time.perf_counter()
            client.segment(image, points=[click_at(rng)])
            new.append((time.perf_counter() - started) * 1000)
    return {"cached_ms": statistics.median(cached), "new_ms": statistics.median(new),
            "decoder_compute_ms": dec["compute_ms"] / max(1, dec["executions"]), "clicks": clicks,
            "new_images": new_images}


def annotator_requests(kind: str, rng, previous):
    """The next click of one annotator: segment() keyword arguments."""
    if kind == "1-point":
        return {"points": [click_at(rng)]}
    step = previous["step"] % 4
    first = previous.get("first") or click_at(rng)
    if step == 0:
        previous["first"] = first = click_at(rng)
        return {"points": [first], "multimask": True, "return_low_res_logits": True}
    if step == 1:
        return {"points": [first, click_at(rng)], "point_labels": [1, 0], "return_low_res_logits": True}
    if step == 2:
        return {"points": [first, click_at(rng)], "point_labels": [1, 1], "mask_input": previous["logits"],
                "return_low_res_logits": True}
    x, y = first
    return {"boxes": [[max(0, x - 80), max(0, y - 60), min(WIDTH, x + 80), min(HEIGHT, y + 60)]], "points": [first]}


async def clickers(url: str, images: list[bytes], kind: str, users: int, clicks_each: int, seed: int) -> list[float]:
    latencies: list[float] = []

    async def annotator(user: int):
        rng = np.random.default_rng(seed + user)
        image = images[user % len(images)]
        state = {"step": 0, "logits": None}
        async with AsyncSamClient(url) as client:
            for _ in range(clicks_each):
                kwargs = annotator_requests(kind, rng, state)
                started = time.perf_counter()
                result = await client.segment(image, **kwargs)
                latencies.append((time.perf_counter() - started) * 1000)
                if result.low_res_logits is not None:
                    state["logits"] = result.best().low_res_logits[:, 0]
                state["step"] += 1

    await asyncio.gather(*(annotator(u) for u in range(users)))
    return latencies


def concurrent(url: str, decoder: str, kind: str, users: int, clicks_each: int) -> dict:
    images = [jpeg(3000 + i) for i in range(4)]
    with SamClient(url) as client:
        for image in images:
            client.encode(image)
    before = model_stats(url, decoder)
    started = time.perf_counter()
    latencies = asyncio.run(clickers(url, images, kind, users, clicks_each, seed=7))
    seconds = time.perf_counter() - started
    time.sleep(0.2)
    dec = delta(model_stats(url, decoder), before)
    return {"requests": len(latencies), "throughput_rps": len(latencies) / seconds,
            "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
            "decoder_executions": dec["executions"], "decoder_inferences": dec["inferences"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", default="var/model_repository")
    parser.add_argument("--clicks", type=int, default=15, help="sequential clicks on the cached image")
    parser.add_argument("--new-images", type=int, default=5)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--clicks-each", type=int, default=12, help="clicks per concurrent annotator")
    args = parser.parse_args()
    repo = Path(args.model_repository)
    names = repository_names(repo)

    with serving(repo) as url:
        single = per_click(url, names.mask_decoder, args.clicks, args.new_images, np.random.default_rng(0))
        loads = {kind: concurrent(url, names.mask_decoder, kind, args.users, args.clicks_each)
                 for kind in ("1-point", "mixed")}

    desc = machine()
    model = repository_parameters(repo, spec.ENSEMBLE)["samtriton_model"]
    ratio = single["new_ms"] / single["cached_ms"]
    print(f"machine: {desc}\n`{spec.ENSEMBLE}` ({model}), {WIDTH}x{HEIGHT} JPEG, gRPC, medians")
    print(f"  1-point click, cached image ({single['clicks']} clicks)    {single['cached_ms']:8.1f} ms"
          f"   (decoder compute {single['decoder_compute_ms']:.1f} ms of it)")
    print(f"  1-point click, new image ({single['new_images']} images)       {single['new_ms']:8.1f} ms")
    print(f"  ratio new / cached: {ratio:.1f}x")
    print(f"  {args.users} concurrent clickers on 4 cached images, {args.clicks_each} clicks each:")
    for kind, r in loads.items():
        print(f"    {kind:<8} {r['throughput_rps']:6.2f} clicks/s  p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms"
              f"  decoder {r['decoder_executions']} executions for {r['decoder_inferences']} requests")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "clicks.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["machine", "model", "what", "requests", "median_or_p50_ms", "p95_ms", "throughput_rps",
                    "decoder_executions", "decoder_inferences"])
        w.writerow([desc, model, "1-point click, cached image", single["clicks"], f"{single['cached_ms']:.1f}",
                    "", "", "", ""])
        w.writerow([desc, model, "1-point click, new image", single["new_images"], f"{single['new_ms']:.1f}",
                    "", "", "", ""])
        w.writerow([desc, model, "decoder compute per click (Triton statistics)", single["clicks"],
                    f"{single['decoder_compute_ms']:.1f}", "", "", "", ""])
        for kind, r in loads.items():
            w.writerow([desc, model, f"{args.users} clickers on 4 images, {kind}", r["requests"], f"{r['p50_ms']:.1f}",
                        f"{r['p95_ms']:.1f}", f"{r['throughput_rps']:.2f}", r["decoder_executions"],
                        r["decoder_inferences"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
