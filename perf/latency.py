"""Encoder / decoder latency in-process (ONNX Runtime) and end to end through the served ensemble.

    .venv/bin/python perf/latency.py --model-repository var/model_repository [--model NAME] [--in-process-only]

Prints medians (this kind of machine is shared and noisy) and writes
perf/results/latency.csv (latency_<model>.csv with --model) with the
machine's description.  `--model` picks a variant of a repository holding
several; the served rows then call that variant's ensemble.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from samtriton import server, spec
from samtriton.client import SamClient
from samtriton.sample_image import sample_scene
from samtriton.serving.onnx_runtime import decode, encode, make_session
from samtriton.serving.pipeline import repository_parameters
from samtriton.serving import decoder_batch
from samtriton.serving.preprocessing import PreprocessSettings, preprocess
from samtriton.serving.prompts import PromptInputs, build_prompts
from samtriton.variants import get_variant

RESULTS = Path(__file__).parent / "results"
# The perf scripts' test image size: a typical camera aspect ratio, long side 1024.
WIDTH, HEIGHT = 1024, 683


def jpeg(seed: int, width: int = WIDTH, height: int = HEIGHT) -> bytes:
    """A generated sample scene as JPEG bytes; another seed, other pixels (a new image to the cache)."""
    scene, _ = sample_scene(width, height, seed=seed)
    buf = io.BytesIO()
    scene.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    from samtriton.serving.cpu_runtime import native_bf16_flags

    # bf16 figures depend on what runs it: AMX tiles or avx512_bf16's vector dot products.
    bf16 = native_bf16_flags()
    return (f"{cpu}, {os.cpu_count()} cores, native bf16: {'+'.join(bf16) if bf16 else 'none'}, "
            f"{platform.system()} {platform.release()}, no GPU")


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def model_stats(url: str, model: str) -> dict[str, float]:
    """A model's cumulative Triton statistics (gRPC at `url`): counts and compute time."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        s = client.get_inference_statistics(model).model_stats[0]
    finally:
        client.close()
    return {"executions": s.execution_count, "inferences": s.inference_count,
            "cache_hits": s.inference_stats.cache_hit.count, "cache_misses": s.inference_stats.cache_miss.count,
            "compute_ms": s.inference_stats.compute_infer.ns / 1e6}


@contextmanager
def serving_with_metrics(repo: Path, extra_args: tuple[str, ...] = ()):
    """A tritonserver on `repo` on free ports for the duration (with tritonserver's
    `extra_args`); yields its gRPC URL and its metrics URL."""
    http, grpc, metrics = server.free_ports(3)
    proc = server.start(server.ServerOptions(Path(repo), http, grpc, metrics, extra_args=extra_args),
                        stdout=open(os.devnull, "wb"), stderr=open(os.devnull, "wb"))
    try:
        server.wait_ready(proc, http)
        yield f"127.0.0.1:{grpc}", f"http://127.0.0.1:{metrics}/metrics"
    finally:
        server.stop(proc)


@contextmanager
def serving(repo: Path):
    """A tritonserver on `repo` on free ports for the duration; yields its gRPC URL."""
    with serving_with_metrics(repo) as (url, _):
        yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", default="var/model_repository")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", help="variant to time (default: the repository's default, `sam`)")
    parser.add_argument("--in-process-only", action="store_true", help="skip the served rows")
    args = parser.parse_args()
    repo = Path(args.model_repository)
    variant = get_variant(args.model or repository_parameters(repo, spec.ENSEMBLE)["samtriton_model"])
    names = spec.model_names(variant.slug)

    scene, boxes = sample_scene(1024, 683)
    image_bytes = __import__("io").BytesIO()
    scene.save(image_bytes, format="JPEG", quality=92)
    image_bytes = image_bytes.getvalue()
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, [900, 560], size=(41, 2))
    extra = np.concatenate([corners, corners + rng.uniform(30, 120, size=(41, 2))], axis=1)
    many = np.concatenate([boxes, extra]).astype(np.float32)[:47]

    settings = PreprocessSettings.for_variant(variant)
    pre = preprocess(image_bytes, PromptInputs(boxes=many), settings)
    enc = make_session(str(repo / names.image_encoder / "1" / "model.onnx"))
    dec = make_session(str(repo / names.mask_decoder / "1" / "model.onnx"))
    emb = encode(enc, pre.pixel_values[None])

    def decoder_call(inputs: PromptInputs):
        prompts = build_prompts(inputs, pre.geometry, settings.limits)
        feeds = decoder_batch.stack([decoder_batch.DecoderRequest.of(emb, prompts)], [False]).feeds
        return lambda: decode(dec, feeds)

    click = PromptInputs(points=np.array([[[300.0, 200.0]]], np.float32), point_labels=np.ones((1, 1), np.int32))
    rows = [
        ("in-process", "encoder 1 image", median_ms(lambda: encode(enc, pre.pixel_values[None]), args.runs)),
        ("in-process", "decoder 1 box", median_ms(decoder_call(PromptInputs(boxes=many[:1])), args.runs * 2)),
        ("in-process", "decoder 1 click", median_ms(decoder_call(click), args.runs * 2)),
        ("in-process", "decoder 47 boxes, one call", median_ms(
            decoder_call(PromptInputs(boxes=many)), max(3, args.runs // 2))),
    ]

    if not args.in_process_only:
        rows.extend(served_rows(repo, variant, image_bytes, many, args.runs))

    desc = machine()
    print(f"machine: {desc}\nimage 1024x683 JPEG, {variant.name} (encoder input {variant.encoder_size}), "
          "ONNX Runtime CPU fp32, medians")
    for where, what, ms in rows:
        print(f"  {where:<14} {what:<28} {ms:9.1f} ms")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "latency.csv" if args.model is None else f"latency_{variant.slug}.csv"
    with open(RESULTS / name, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["machine", "model", "where", "what", "median_ms"])
        for where, what, ms in rows:
            w.writerow([desc, variant.name, where, what, f"{ms:.1f}"])


def served_rows(repo: Path, variant, image_bytes: bytes, many: np.ndarray, runs: int) -> list[tuple]:
    with serving(repo) as url:
        with SamClient(url, model=variant.name) as client:
            # The same image every time: after the first request the encoder answers from its cache.
            return [
                ("served (gRPC)", "1 box, cached image", median_ms(lambda: client.segment(image_bytes, many[:1]), runs)),
                ("served (gRPC)", "1 click, cached image", median_ms(
                    lambda: client.segment(image_bytes, points=[[300.0, 200.0]]), runs)),
                ("served (gRPC)", "47 boxes, cached image", median_ms(
                    lambda: client.segment(image_bytes, many), max(3, runs // 2))),
            ]


if __name__ == "__main__":
    main()
