"""Segment everything: what a request costs, where the time goes, and what it does to other clients.

    .venv/bin/python perf/everything.py --model-repository var/model_repository

Starts a server on the repository (its default variant, `sam_everything`)
and measures, in one run, over gRPC, on a 1024x683 JPEG:

1. per points_per_side (8, 16, 32; upstream's other defaults): the time of an
   everything-request on a new image (the encoder runs), median of --runs,
   split into stages by the model's own counter
   samtriton_everything_seconds_total{stage=image|encoder|decoder|filtering}
   (encoder and decoder: time waiting for their answers, queues included),
   with the decoder's requests vs executions and compute time per point
   (Triton's statistics; a batched execution's time counts once per request
   in it), and the same request again on the now cached image;
2. fairness: the p50 / p95 of 1-box requests on cached images from one
   client, alone and while 2 everything-requests (points_per_side 16) run,
   and the decoder's requests vs executions meanwhile (batching at work).

Prints tables and writes perf/results/everything.csv (machine named per row).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from samtriton import server, spec
from samtriton.client import SamClient
from samtriton.serving.everything import STAGES
from samtriton.serving.pipeline import repository_names

sys.path.insert(0, str(Path(__file__).parent))
from latency import HEIGHT, RESULTS, WIDTH, delta, jpeg, machine, model_stats  # noqa: E402

def stage_seconds(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = dict.fromkeys(STAGES, 0.0)
    pattern = re.compile(rf'^{spec.EVERYTHING_SECONDS_METRIC}\{{([^}}]*)\}}\s+([0-9.eE+-]+)$')
    for line in text.splitlines():
        match = pattern.match(line)
        if match and f'model="{spec.EVERYTHING}"' in match.group(1):
            stage = re.search(r'stage="([^"]+)"', match.group(1)).group(1)
            out[stage] += float(match.group(2))
    return out


def timed_request(url: str, metrics_port: int, decoder: str, image: bytes, params: dict) -> dict:
    stages, dec = stage_seconds(metrics_port), model_stats(url, decoder)
    with SamClient(url, timeout_s=900) as client:
        started = time.perf_counter()
        result = client.segment_everything(image, **params)
        seconds = time.perf_counter() - started
    time.sleep(0.3)  # Triton records statistics just after answering
    return {"seconds": seconds, "masks": len(result), **delta(stage_seconds(metrics_port), stages),
            **{f"decoder_{k}": v for k, v in delta(model_stats(url, decoder), dec).items()}}


def fairness(url: str, decoder: str, runs: int, everything_params: dict) -> tuple[list[float], list[float], dict]:
    """1-box latencies (ms) on cached images: alone, then while 2 everything-requests run; and the
    decoder's requests and executions meanwhile."""
    images = [jpeg(500 + i) for i in range(4)]
    rng = np.random.default_rng(0)

    def box():
        x, y = rng.uniform(0, [WIDTH - 200, HEIGHT - 200])
        return [[float(x), float(y), float(x + 150), float(y + 120)]]

    with SamClient(url) as client:
        for image in images:
            client.encode(image)

        def clicks(n: int) -> list[float]:
            out = []
            for i in range(n):
                started = time.perf_counter()
                client.segment(images[i % 4], box())
                out.append((time.perf_counter() - started) * 1000)
            return out

        alone = clicks(runs)
        loaded = []

        def everything(seed):
            with SamClient(url, timeout_s=900) as own:
                own.segment_everything(jpeg(seed), **everything_params)

        workers = [threading.Thread(target=everything, args=(700 + i,)) for i in range(2)]
        before = model_stats(url, decoder)
        for w in workers:
            w.start()
        time.sleep(2.0)  # both are past their encoder call and feeding the decoder
        while any(w.is_alive() for w in workers):
            loaded += clicks(1)
        for w in workers:
            w.join()
        time.sleep(0.3)
        dec = delta(model_stats(url, decoder), before)
    return alone, loaded, dec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", default="var/model_repository")
    parser.add_argument("--runs", type=int, default=3, help="requests per grid size (new images)")
    parser.add_argument("--sides", default="8,16,32")
    parser.add_argument("--fairness-requests", type=int, default=20)
    args = parser.parse_args()
    repo = Path(args.model_repository)
    decoder = repository_names(repo).mask_decoder
    http, grpc, metrics = server.free_ports(3)
    proc = server.start(server.ServerOptions(repo, http, grpc, metrics),
                        stdout=open(os.devnull, "wb"), stderr=open(os.devnull, "wb"))
    url = f"127.0.0.1:{grpc}"
    rows = []
    try:
        server.wait_ready(proc, http)
        with SamClient(url) as client:  # warm-up: first calls pay one-off costs
            client.segment_everything(jpeg(1), points_per_side=2)
        seed = 100
        print(f"segment everything, {WIDTH}x{HEIGHT} JPEG, upstream's defaults but points_per_side; "
              f"medians of {args.runs} new images ({machine()})")
        print(f"{'side':>5} {'points':>6} {'new image s':>11} {'image':>6} {'encoder':>8} {'decoder':>8} "
              f"{'filter':>7} {'dec req':>8} {'dec exec':>9} {'dec ms/pt':>10} {'cached s':>9} {'masks':>6}")
        for side in (int(s) for s in args.sides.split(",") if s):
            params = {"points_per_side": side}
            samples = []
            for _ in range(args.runs):
                seed += 1
                image = jpeg(seed)
                samples.append(timed_request(url, metrics, decoder, image, params))
            again = timed_request(url, metrics, decoder, image, params)  # the last image, now cached

            def med(key):
                return statistics.median(s[key] for s in samples)

            row = {"machine": machine(), "points_per_side": side, "points": side * side,
                   "new_image_s": med("seconds"), **{f"{k}_s": med(k) for k in STAGES},
                   "decoder_requests": med("decoder_inferences"), "decoder_executions": med("decoder_executions"),
                   "decoder_compute_ms_per_point": med("decoder_compute_ms") / (side * side),
                   "cached_image_s": again["seconds"], "cached_encoder_s": again["encoder"], "masks": med("masks")}
            rows.append(row)
            print(f"{side:>5} {side * side:>6} {row['new_image_s']:>11.2f} {row['image_s']:>6.2f} "
                  f"{row['encoder_s']:>8.2f} {row['decoder_s']:>8.2f} {row['filtering_s']:>7.2f} "
                  f"{row['decoder_requests']:>8.0f} {row['decoder_executions']:>9.0f} "
                  f"{row['decoder_compute_ms_per_point']:>10.1f} {row['cached_image_s']:>9.2f} {row['masks']:>6.0f}")

        alone, loaded, dec = fairness(url, decoder, args.fairness_requests, {"points_per_side": 16})
        p = {name: (float(np.percentile(v, 50)), float(np.percentile(v, 95))) for name, v in
             (("alone", alone), ("with 2 everything-requests", loaded))}
        print(f"\n1-box requests on cached images, one client ({machine()}):")
        for name, (p50, p95) in p.items():
            n = len(alone) if name == "alone" else len(loaded)
            print(f"  {name:<28} n={n:<4} p50 {p50:7.0f} ms   p95 {p95:7.0f} ms")
        print(f"  p95 ratio (loaded / alone): {p['with 2 everything-requests'][1] / p['alone'][1]:.1f}x")
        print(f"  decoder meanwhile: {dec['inferences']:.0f} requests in {dec['executions']:.0f} executions "
              "(the everything-requests' and the box requests, batched together)")
        rows.append({"machine": machine(), "points_per_side": "fairness", "box_p50_alone_ms": p["alone"][0],
                     "box_p95_alone_ms": p["alone"][1], "box_p50_loaded_ms": p["with 2 everything-requests"][0],
                     "box_p95_loaded_ms": p["with 2 everything-requests"][1], "loaded_requests": len(loaded),
                     "decoder_requests": dec["inferences"], "decoder_executions": dec["executions"]})
    finally:
        server.stop(proc)
    RESULTS.mkdir(exist_ok=True)
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "machine", k))
    with open(RESULTS / "everything.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {RESULTS / 'everything.csv'}")


if __name__ == "__main__":
    main()
