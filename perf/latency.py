"""Encoder / decoder latency in-process (ONNX Runtime) and end to end through the served ensemble.

    .venv/bin/python perf/latency.py --model-repository var/model_repository

Prints medians (this kind of machine is shared and noisy) and writes
perf/results/latency.csv with the machine's description.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from samtriton import server, spec
from samtriton.build.registry import DEFAULT_MODEL, get_variant
from samtriton.client import SamClient
from samtriton.sample_image import sample_scene
from samtriton.serving.onnx_runtime import decode, encode, make_session
from samtriton.serving.preprocessing import preprocess

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, no GPU"


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", default="var/model_repository")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    repo = Path(args.model_repository)

    scene, boxes = sample_scene(1024, 683)
    image_bytes = __import__("io").BytesIO()
    scene.save(image_bytes, format="JPEG", quality=92)
    image_bytes = image_bytes.getvalue()
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, [900, 560], size=(41, 2))
    extra = np.concatenate([corners, corners + rng.uniform(30, 120, size=(41, 2))], axis=1)
    many = np.concatenate([boxes, extra]).astype(np.float32)[:47]

    variant = get_variant(DEFAULT_MODEL)
    pre = preprocess(image_bytes, many, variant.image_size, variant.pixel_mean, variant.pixel_std)
    enc = make_session(str(repo / spec.IMAGE_ENCODER / "1" / "model.onnx"))
    dec = make_session(str(repo / spec.MASK_DECODER / "1" / "model.onnx"))
    emb = encode(enc, pre.pixel_values[None])
    rows = [
        ("in-process", "encoder 1 image", median_ms(lambda: encode(enc, pre.pixel_values[None]), args.runs)),
        ("in-process", "decoder 1 box", median_ms(
            lambda: decode(dec, emb, pre.model_boxes[:1], np.zeros(1, np.int32)), args.runs * 2)),
        ("in-process", "decoder 47 boxes, one call", median_ms(
            lambda: decode(dec, emb, pre.model_boxes, np.zeros(47, np.int32)), max(3, args.runs // 2))),
    ]

    http, grpc, metrics = server.free_ports(3)
    proc = server.start(server.ServerOptions(repo, http, grpc, metrics),
                        stdout=open(os.devnull, "wb"), stderr=open(os.devnull, "wb"))
    try:
        server.wait_ready(proc, http)
        with SamClient(f"127.0.0.1:{grpc}") as client:
            rows.append(("served (gRPC)", "ensemble 1 box", median_ms(
                lambda: client.segment(image_bytes, many[:1]), args.runs)))
            rows.append(("served (gRPC)", "ensemble 47 boxes", median_ms(
                lambda: client.segment(image_bytes, many), max(3, args.runs // 2))))
    finally:
        server.stop(proc)

    desc = machine()
    print(f"machine: {desc}\nimage 1024x683 JPEG, MobileSAM, ONNX Runtime CPU fp32, medians")
    for where, what, ms in rows:
        print(f"  {where:<14} {what:<28} {ms:9.1f} ms")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "latency.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["machine", "where", "what", "median_ms"])
        for where, what, ms in rows:
            w.writerow([desc, where, what, f"{ms:.1f}"])


if __name__ == "__main__":
    main()
