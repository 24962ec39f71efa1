"""Serving overhead: the served `sam` ensemble vs the same pipeline in-process.

    .venv/bin/python perf/serving_overhead.py --model-repository var/model_repository

Same model files, same ONNX Runtime thread settings (the repository's
`intra_op_threads`), new images every request (the server runs without its
response cache, so both sides run the encoder every time):
- latency at concurrency 1: median over --requests requests;
- throughput at saturation: --concurrency requests in flight (SamClient.segment_many
  served; a thread pool of the same size in-process), requests per second.
Prints both and the served/in-process ratios; writes perf/results/serving_overhead.csv.
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
from samtriton.sample_image import sample_scene  # noqa: E402
from samtriton.serving.pipeline import InProcessPipeline, repository_parameters  # noqa: E402


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", default="var/model_repository")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--boxes", type=int, default=5)
    args = parser.parse_args(argv)
    repo = Path(args.model_repository)
    pipe = InProcessPipeline(repo)  # the default variant, as `sam` serves it
    threads = int(repository_parameters(repo, pipe.names.image_encoder).get("intra_op_threads", "0"))
    pipe = InProcessPipeline(repo, intra_op_threads=threads)
    pipe.segment(*workload(1, 99, args.boxes)[0])  # warm-up
    inproc_latency = latency_ms(pipe.segment, workload(args.requests, 100, args.boxes))
    burst = workload(args.concurrency * 2, 200, args.boxes)
    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(lambda item: pipe.segment(*item), burst))
    inproc_throughput = len(burst) / (time.perf_counter() - started)

    http, grpc, metrics = server.free_ports(3)
    proc = server.start(server.ServerOptions(repo, http, grpc, metrics, cache_bytes=0, embedding_cache_mb=0),
                        stdout=open(os.devnull, "wb"), stderr=open(os.devnull, "wb"))
    try:
        server.wait_ready(proc, http)
        with SamClient(f"127.0.0.1:{grpc}") as client:
            client.segment(*workload(1, 299, args.boxes)[0])  # warm-up
            served_latency = latency_ms(client.segment, workload(args.requests, 300, args.boxes))
            burst = workload(args.concurrency * 2, 400, args.boxes)
            started = time.perf_counter()
            client.segment_many(burst, concurrency=args.concurrency)
            served_throughput = len(burst) / (time.perf_counter() - started)
    finally:
        server.stop(proc)

    desc = machine()
    print(f"machine: {desc}\nMobileSAM, 1024x683 JPEG, {args.boxes} boxes/request, new image per request, "
          f"ONNX Runtime intra_op_threads={threads}")
    print(f"  latency at concurrency 1 (median of {args.requests}): served {served_latency:.0f} ms, "
          f"in-process {inproc_latency:.0f} ms, ratio {served_latency / inproc_latency:.2f}x")
    print(f"  throughput at concurrency {args.concurrency} ({2 * args.concurrency} requests): "
          f"served {served_throughput:.2f}/s, in-process {inproc_throughput:.2f}/s, "
          f"ratio {served_throughput / inproc_throughput:.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "serving_overhead.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["machine", "metric", "served", "in_process", "served_over_in_process"])
        w.writerow([desc, "latency_ms_concurrency_1", f"{served_latency:.1f}", f"{inproc_latency:.1f}",
                    f"{served_latency / inproc_latency:.2f}"])
        w.writerow([desc, f"throughput_per_s_concurrency_{args.concurrency}", f"{served_throughput:.3f}",
                    f"{inproc_throughput:.3f}", f"{served_throughput / inproc_throughput:.2f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
