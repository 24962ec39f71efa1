"""Serving overhead: the served `sam` ensemble vs the same pipeline in-process.

    .venv/bin/python perf/serving_overhead.py --model-repository var/model_repository

Same model files, runtimes and thread settings (the repository's), new images
every request (and the server runs without its embedding cache), so both sides
run the encoder every time.  The two sides are measured in pairs, so that a
shared host's drifting speed (seen here: 1.7 to 3.0 in-process requests/s
within one run) falls on both alike:
- latency at concurrency 1: each of --requests requests a round runs in-process
  and served back to back, on the same image and boxes, in alternating order;
  the ratio is the median of the pairs' ratios;
- throughput at saturation: a burst of 2 x --concurrency requests in flight
  (SamClient.segment_many served; a thread pool of the same size in-process),
  in-process and served back to back on the same burst, the order alternating
  between rounds; the ratio is the median of the rounds' ratios.
The served side fetches its masks as the SDK does by default, 8 pixels a
byte (`masks_packed`, unpacked by the SDK); the in-process side hands over
its arrays.  `--mask-transport dense` fetches them a byte a pixel, as the
in-process side holds them, and `rle` as COCO RLE (the postprocess encodes
them, the SDK decodes them: 1.4-3.3 ms a mask each for a random-weight
checkpoint's noisy masks).  Each round's ratios are
printed, then the medians; writes
perf/results/serving_overhead[_<slug>][_rle|_dense].csv.
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
from samtriton.client.protocol import DEFAULT_MASK_TRANSPORT, MASK_TRANSPORTS  # noqa: E402
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


def timed_ms(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - started) * 1000


def paired_round(pipe, client: SamClient, args, seed: int, served_first: bool):
    """[(served ms, in-process ms)] a request at concurrency 1, and (served, in-process)
    requests/s for one burst at --concurrency, each pair run back to back on the same work."""
    latencies = []
    for i, (image, boxes) in enumerate(workload(args.requests, seed, args.boxes)):
        first_served = served_first != bool(i % 2)
        sides = [("served", lambda *a: client.segment(*a, mask_transport=args.mask_transport)),
                 ("in-process", pipe.segment)]
        t = dict((name, timed_ms(fn, image, boxes)) for name, fn in (sides if first_served else sides[::-1]))
        latencies.append((t["served"], t["in-process"]))

    burst = workload(args.concurrency * 2, seed + 100, args.boxes)

    def in_process():
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda item: pipe.segment(*item), burst))

    sides = [("served", lambda: client.segment_many(burst, concurrency=args.concurrency,
                                                    mask_transport=args.mask_transport)),
             ("in-process", in_process)]
    rates = dict((name, len(burst) * 1000 / timed_ms(fn)) for name, fn in (sides if served_first else sides[::-1]))
    return latencies, (rates["served"], rates["in-process"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", default="var/model_repository")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--boxes", type=int, default=5)
    parser.add_argument("--model", help="variant (default: the repository's default, `sam`)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds of paired requests and bursts, in alternating order; the ratios are medians")
    parser.add_argument("--mask-transport", choices=MASK_TRANSPORTS, default=DEFAULT_MASK_TRANSPORT,
                        help="how the served side fetches masks: packed bits (the SDK's default), COCO RLE or "
                             "the dense arrays")
    args = parser.parse_args(argv)
    # The served postprocess runs with these heap settings: so does its in-process twin, so
    # that the ratio is what serving adds, not what glibc's defaults cost.
    keep_freed_heap()
    repo = Path(args.model_repository)
    names = repository_names(repo, args.model)
    threads = int(repository_parameters(repo, names.image_encoder).get("intra_op_threads", "0"))
    pipe = InProcessPipeline(repo, intra_op_threads=threads, model=args.model)

    http, grpc, metrics = server.free_ports(3)
    proc = server.start(server.ServerOptions(repo, http, grpc, metrics, cache_bytes=0, embedding_cache_mb=0),
                        stdout=open(os.devnull, "wb"), stderr=open(os.devnull, "wb"))
    latencies, rates = [], []
    try:
        server.wait_ready(proc, http)
        with SamClient(f"127.0.0.1:{grpc}", model=args.model) as client:
            # Warm-up, bursts included: OpenVINO prepares its kernels for each new
            # input shape (batch sizes, prompt counts) on first sight.
            paired_round(pipe, client, argparse.Namespace(**{**vars(args), "requests": 2}), 90, True)
            for r in range(args.rounds):
                # New images everywhere (seeds of their own): every request runs the encoder.
                pairs, rate = paired_round(pipe, client, args, 1000 * r + 100, served_first=bool(r % 2))
                latencies += pairs
                rates.append(rate)
                print(f"  round {r + 1} ({'served' if r % 2 else 'in-process'} first): latency "
                      f"{statistics.median(s for s, _ in pairs):.0f} / {statistics.median(i for _, i in pairs):.0f} ms, "
                      f"pairs {min(s / i for s, i in pairs):.2f}-{max(s / i for s, i in pairs):.2f}x; throughput "
                      f"served {rate[0]:.2f} / in-process {rate[1]:.2f} req/s = {rate[0] / rate[1]:.2f}x", flush=True)
    finally:
        server.stop(proc)

    latency_ratio = statistics.median(s / i for s, i in latencies)
    throughput_ratio = statistics.median(s / i for s, i in rates)
    served_latency = statistics.median(s for s, _ in latencies)
    inproc_latency = statistics.median(i for _, i in latencies)
    served_throughput = statistics.median(s for s, _ in rates)
    inproc_throughput = statistics.median(i for _, i in rates)
    desc = machine()
    enc = repository_parameters(repo, pipe.names.image_encoder)
    dec = repository_parameters(repo, pipe.names.mask_decoder)
    print(f"machine: {desc}\n{pipe.names.image_encoder.rsplit('_image_encoder', 1)[0]}, 1024x683 JPEG, "
          f"{args.boxes} boxes/request, new image per request, encoder {enc.get('runtime', 'onnxruntime')} "
          f"{enc.get('precision', 'fp32')}, decoder {dec.get('runtime', 'onnxruntime')} {dec.get('precision', 'fp32')}, "
          f"threads={threads or 'all cores'}, served masks as {args.mask_transport}; {args.rounds} rounds")
    print(f"  latency at concurrency 1: served {served_latency:.0f} ms, in-process {inproc_latency:.0f} ms (medians); "
          f"ratio {latency_ratio:.2f}x, the median of {len(latencies)} pairs (target <= 1.05)")
    print(f"  throughput at concurrency {args.concurrency}: served {served_throughput:.2f}/s, in-process "
          f"{inproc_throughput:.2f}/s (medians); ratio {throughput_ratio:.2f}x, the median of {len(rates)} rounds "
          f"(target >= 0.95)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "serving_overhead" + ("" if args.model is None else f"_{get_variant(args.model).slug}")
    name += ("" if args.mask_transport == DEFAULT_MASK_TRANSPORT else f"_{args.mask_transport}") + ".csv"
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
