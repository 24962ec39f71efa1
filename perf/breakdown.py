"""Where a request's time goes, from Triton's own statistics.

    .venv/bin/python perf/breakdown.py --model-repository var/model_repository

Sends --requests sequential `sam` requests (new image each, --boxes boxes,
response cache off) and reads the per-model statistics Triton kept meanwhile:
queue and compute (input + infer + output) per request for preprocess,
image_embedding (which answers through its response sender: Triton counts its
compute as the time to hand the request to its event loop), image_encoder
(called by image_embedding on a miss), mask_decoder and postprocess, the
ensemble's own total, and
what is left of the client's latency: the wire and the client (encoding the
request, decoding RLE); then the COCO RLE's two halves timed apart on the last
response's masks.  Writes perf/results/breakdown.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import tritonclient.grpc as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import RESULTS, machine  # noqa: E402
from serving_overhead import workload  # noqa: E402

from samtriton import server, spec  # noqa: E402
from samtriton.client import SamClient  # noqa: E402
from samtriton.serving.postprocessing import decode_rle, encode_rle  # noqa: E402
from samtriton.variants import DEFAULT_MODEL, get_variant  # noqa: E402

# The default variant's steps, which `sam` (what SamClient calls by default) runs.
_NAMES = spec.default_names(get_variant(DEFAULT_MODEL).slug)
STEPS = (_NAMES.preprocess, _NAMES.image_embedding, _NAMES.image_encoder, _NAMES.mask_decoder, _NAMES.postprocess)


def snapshot(url: str, models=(spec.ENSEMBLE, *STEPS)) -> dict[str, dict[str, int]]:
    """Each model's cumulative Triton statistics: successes, their total, queue and compute time."""
    client = grpcclient.InferenceServerClient(url)
    try:
        out = {}
        for model in models:
            s = client.get_inference_statistics(model).model_stats[0].inference_stats
            out[model] = {
                "count": s.success.count, "total_ns": s.success.ns, "queue_ns": s.queue.ns,
                "compute_ns": s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns,
            }
        return out
    finally:
        client.close()


def median_ms(fn, repeat: int = 21) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", default="var/model_repository")
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--boxes", type=int, default=5)
    args = parser.parse_args(argv)

    http, grpc, metrics = server.free_ports(3)
    proc = server.start(server.ServerOptions(Path(args.model_repository), http, grpc, metrics, cache_bytes=0,
                                             embedding_cache_mb=0),
                        stdout=open(os.devnull, "wb"), stderr=open(os.devnull, "wb"))
    try:
        server.wait_ready(proc, http)
        url = f"127.0.0.1:{grpc}"
        with SamClient(url) as client:
            client.segment(*workload(1, 499, args.boxes)[0])  # warm-up
            work = workload(args.requests, 500, args.boxes)
            time.sleep(0.3)
            before = snapshot(url)
            started = time.perf_counter()
            for image, boxes in work:
                last = client.segment(image, boxes)
            client_ms = (time.perf_counter() - started) * 1000 / len(work)
            time.sleep(0.3)  # Triton records a request's statistics just after answering it
            after = snapshot(url)
    finally:
        server.stop(proc)

    def per_request_ms(model, key):
        count = after[model]["count"] - before[model]["count"]
        return (after[model][key] - before[model][key]) / max(count, 1) / 1e6

    # The COCO RLE serving adds on both sides, timed here on the last response's masks.
    rle_encode_ms = median_ms(lambda: encode_rle(last.masks))
    rle_decode_ms = median_ms(lambda: decode_rle(last.rles))
    rows = [(m, per_request_ms(m, "queue_ns"), per_request_ms(m, "compute_ns")) for m in STEPS]
    ensemble_ms = per_request_ms(spec.ENSEMBLE, "total_ns")
    desc = machine()
    print(f"machine: {desc}\nMobileSAM, 1024x683 JPEG, {args.boxes} boxes, {args.requests} sequential requests, "
          "no response cache; mean per request")
    print(f"  {'step':<28}{'queue':>10}{'compute':>12}")
    for model, queue, compute in rows:
        print(f"  {model:<28}{queue:8.1f} ms{compute:10.1f} ms")
    steps_ms = sum(q + c for _, q, c in rows)
    print(f"  ensemble total (server side)  {ensemble_ms:8.1f} ms  (sum of the steps' queue + compute: "
          f"{steps_ms:.1f} ms)")
    print(f"  client latency                {client_ms:8.1f} ms  (wire + client work: {client_ms - ensemble_ms:.1f} ms)")
    print(f"  COCO RLE of the last response's {len(last.rles)} masks, in this process (median of 21): "
          f"encode {rle_encode_ms:.1f} ms (the postprocess's part), decode {rle_decode_ms:.1f} ms (the SDK's)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "breakdown.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["machine", "part", "queue_ms", "compute_ms"])
        for model, queue, compute in rows:
            w.writerow([desc, model, f"{queue:.1f}", f"{compute:.1f}"])
        w.writerow([desc, "ensemble total (server)", "", f"{ensemble_ms:.1f}"])
        w.writerow([desc, "wire + client", "", f"{client_ms - ensemble_ms:.1f}"])
        w.writerow([desc, "RLE encode (in-process)", "", f"{rle_encode_ms:.1f}"])
        w.writerow([desc, "RLE decode (in-process)", "", f"{rle_decode_ms:.1f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
