"""Serving overhead: the served `sam` ensemble vs the same pipeline in-process.

    .venv/bin/python perf/serving_overhead.py --model-repository var/model_repository

Same model files, runtimes and thread settings (the repository's), new images
every request (and the server runs without its embedding cache), so both sides
run the encoder every time:
- latency at concurrency 1: median over --requests requests;
- throughput at saturation: --concurrency requests in flight (SamClient.segment_many
  served; a thread pool of the same size in-process), requests per second.
--rounds rounds of in-process then served, each round's ratios printed, then
the medians; writes perf/results/serving_overhead.csv.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import RESULTS, machine  # noqa: E402

from samtriton import server  # noqa: E402
from samtriton.client import SamClient  # noqa: E402
from samtriton.serving.allocator import keep_freed_heap  # noqa: E402
from samtriton.sample_image import sample_scene  # noqa: E402
from samtriton.serving.pipeline import InProcessPipeline, repository_names, repository_parameters  # noqa: E402
from samtriton.variants import get_variant  # noqa: E402


def workload(n: int, seed: int, boxes_per_request: int):
    rng = np.random.default_rng(seed)
    work = []
    for i in range(n):
        scene, _ = sample_scene(1024, 683, seed=seed + i)
        buf = io.BytesIO()
        scene.save(buf, format="JPEG", quality=92)
        xy = rng.uniform(0, [900, 560], size=(boxes_per_request, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(30, 120, size=(boxes_per_request, 2))], axis=1)
        work.append((buf.getvalue(), boxes.astype(np.float32)))
    return work


def latency_ms(fn, work) -> float:
    times = []
    for image, boxes in work:
        started = time.perf_counter()
        fn(image, boxes)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def in_process_round(pipe, args, seed: int) -> tuple[float, float]:
    """(latency ms at concurrency 1, requests/s at --concurrency) in-process."""
    latency = latency_ms(pipe.segment, workload(args.requests, seed, args.boxes))
    burst = workload(args.concurrency * 2, seed + 100, args.boxes)
    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(lambda item: pipe.segment(*item), burst))
    return latency, len(burst) / (time.perf_counter() - started)


def served_round(url: str, args, seed: int) -> tuple[float, float]:
    with SamClient(url, model=args.model) as client:
        latency = latency_ms(client.segment, workload(args.requests, seed, args.boxes))
        burst = workload(args.concurrency * 2, seed + 100, args.boxes)
        started = time.perf_counter()
        client.segment_many(burst, concurrency=args.concurrency)
        return latency, len(burst) / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", default="var/model_repository")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--boxes", type=int, default=5)
    parser.add_argument("--model", help="variant (default: the repository's default, `sam`)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of in-process then served; the ratios are per round, then their median")
    args = parser.parse_args(argv)
    # The served postprocess runs with these heap settings: so does its in-process twin, so
    # that the ratio is what serving adds, not what glibc's defaults cost.
    keep_freed_heap()
    repo = Path(args.model_repository)
    names = repository_names(repo, args.model)
    threads = int(repository_parameters(repo, names.image_encoder).get("intra_op_threads", "0"))
    pipe = InProcessPipeline(repo, intra_op_threads=threads, model=args.model)
    in_process_round(pipe, argparse.Namespace(**{**vars(args), "requests": 1}), 90)  # warm-up

    http, grpc, metrics = server.free_ports(3)
    proc = server.start(server.ServerOptions(repo, http, grpc, metrics, cache_bytes=0, embedding_cache_mb=0),
                        stdout=open(os.devnull, "wb"), stderr=open(os.devnull, "wb"))
    rounds = []
    try:
        server.wait_ready(proc, http)
        url = f"127.0.0.1:{grpc}"
        # Warm-up, a burst included: OpenVINO prepares its kernels for each new
        # input shape (batch sizes, prompt counts) on first sight.
        served_round(url, argparse.Namespace(**{**vars(args), "requests": 1}), 290)
        for r in range(args.rounds):
            # New images everywhere (seeds of their own): every request runs the encoder.
            inproc = in_process_round(pipe, args, 1000 * r + 100)
            served = served_round(url, args, 1000 * r + 500)
            rounds.append((served, inproc))
            print(f"  round {r + 1}: latency served {served[0]:.0f} / in-process {inproc[0]:.0f} ms = "
                  f"{served[0] / inproc[0]:.2f}x; throughput served {served[1]:.2f} / in-process "
                  f"{inproc[1]:.2f} req/s = {served[1] / inproc[1]:.2f}x", flush=True)
    finally:
        server.stop(proc)

    latency_ratio = statistics.median(s[0] / i[0] for s, i in rounds)
    throughput_ratio = statistics.median(s[1] / i[1] for s, i in rounds)
    served_latency = statistics.median(s[0] for s, _ in rounds)
    inproc_latency = statistics.median(i[0] for _, i in rounds)
    served_throughput = statistics.median(s[1] for s, _ in rounds)
    inproc_throughput = statistics.median(i[1] for _, i in rounds)
    desc = machine()
    enc = repository_parameters(repo, pipe.names.image_encoder)
    dec = repository_parameters(repo, pipe.names.mask_decoder)
    print(f"machine: {desc}\n{pipe.names.image_encoder.rsplit('_image_encoder', 1)[0]}, 1024x683 JPEG, "
          f"{args.boxes} boxes/request, new image per request, encoder {enc.get('runtime', 'onnxruntime')} "
          f"{enc.get('precision', 'fp32')}, decoder {dec.get('runtime', 'onnxruntime')} {dec.get('precision', 'fp32')}, "
          f"threads={threads or 'all cores'}; medians of {args.rounds} rounds")
    print(f"  latency at concurrency 1: served {served_latency:.0f} ms, in-process {inproc_latency:.0f} ms, "
          f"ratio {latency_ratio:.2f}x (target <= 1.05)")
    print(f"  throughput at concurrency {args.concurrency}: served {served_throughput:.2f}/s, in-process "
          f"{inproc_throughput:.2f}/s, ratio {throughput_ratio:.2f}x (target >= 0.95)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "serving_overhead.csv" if args.model is None else f"serving_overhead_{get_variant(args.model).slug}.csv"
    with open(RESULTS / name, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["machine", "metric", "served", "in_process", "served_over_in_process", "rounds"])
        w.writerow([desc, "latency_ms_concurrency_1", f"{served_latency:.1f}", f"{inproc_latency:.1f}",
                    f"{latency_ratio:.2f}", args.rounds])
        w.writerow([desc, f"throughput_per_s_concurrency_{args.concurrency}", f"{served_throughput:.3f}",
                    f"{inproc_throughput:.3f}", f"{throughput_ratio:.2f}", args.rounds])
    return 0


if __name__ == "__main__":
    sys.exit(main())
