"""Where a request's time goes, from Triton's own statistics.

    .venv/bin/python perf/breakdown.py --model-repository var/model_repository [--model NAME]

Sends --requests sequential requests, a new image each with --boxes boxes and
the response cache off, to `sam` (the repository's default variant) or to
--model's own ensemble, and reads the per-model statistics Triton kept meanwhile:
queue and compute (input + infer + output) per request for preprocess,
image_embedding (which answers a miss through its response sender from an
event loop: Triton counts its compute as the time to hand the request to the
loop), image_encoder
(called by image_embedding on a miss), mask_decoder and postprocess, the
ensemble's own total, and
what is left of the client's latency: the wire and the client (encoding the
request, unpacking the masks); then, on the last response's masks, what each
mask transport costs at either end: packing and unpacking the bits (the SDK's
default), COCO RLE's encoding and decoding.  Writes perf/results/breakdown.csv.
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
from samtriton.serving.pipeline import repository_names  # noqa: E402
from samtriton.serving.postprocessing import decode_rle, encode_rle, pack_masks, unpack_masks  # noqa: E402


def snapshot(url: str, models) -> dict[str, dict[str, int]]:
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
    parser.add_argument("--model", help="variant (default: the repository's default, `sam`)")
    args = parser.parse_args(argv)
    repo = Path(args.model_repository)
    names = repository_names(repo, args.model)
    ensemble = names.ensemble if args.model else spec.ENSEMBLE
    steps = (names.preprocess, names.image_embedding, names.image_encoder, names.mask_decoder, names.postprocess)

    http, grpc, metrics = server.free_ports(3)
    proc = server.start(server.ServerOptions(repo, http, grpc, metrics, cache_bytes=0,
                                             embedding_cache_mb=0),
                        stdout=open(os.devnull, "wb"), stderr=open(os.devnull, "wb"))
    try:
        server.wait_ready(proc, http)
        url = f"127.0.0.1:{grpc}"
        with SamClient(url, model=args.model) as client:
            # Warm-up: a python step's first requests after the start pay for first-touch memory and
            # OpenCV's first calls (the postprocess's first two: 38-103 ms against 11-14 ms after).
            for image, boxes in workload(3, 496, args.boxes):
                client.segment(image, boxes)
            work = workload(args.requests, 500, args.boxes)
            time.sleep(0.3)
            before = snapshot(url, (ensemble, *steps))
            started = time.perf_counter()
            for image, boxes in work:
                last = client.segment(image, boxes)
            client_ms = (time.perf_counter() - started) * 1000 / len(work)
            time.sleep(0.3)  # Triton records a request's statistics just after answering it
            after = snapshot(url, (ensemble, *steps))
    finally:
        server.stop(proc)

    def per_request_ms(model, key):
        count = after[model]["count"] - before[model]["count"]
        return (after[model][key] - before[model][key]) / max(count, 1) / 1e6

    # What each mask transport adds at either end, timed here on the last response's masks.
    rles, packed = encode_rle(last.masks), pack_masks(last.masks)
    rle_encode_ms, rle_decode_ms = median_ms(lambda: encode_rle(last.masks)), median_ms(lambda: decode_rle(rles))
    pack_ms = median_ms(lambda: pack_masks(last.masks))
    unpack_ms = median_ms(lambda: unpack_masks(packed, last.masks.shape[-1]))
    rows = [(m, per_request_ms(m, "queue_ns"), per_request_ms(m, "compute_ns")) for m in steps]
    ensemble_ms = per_request_ms(ensemble, "total_ns")
    desc = machine()
    print(f"machine: {desc}\n{names.ensemble} (called as {ensemble}), 1024x683 JPEG, {args.boxes} boxes, {args.requests} sequential requests, "
          "no response cache; mean per request")
    print(f"  {'step':<34}{'queue':>10}{'compute':>12}")
    for model, queue, compute in rows:
        print(f"  {model:<34}{queue:8.1f} ms{compute:10.1f} ms")
    steps_ms = sum(q + c for _, q, c in rows)
    print(f"  {'ensemble total (server side)':<34}{ensemble_ms:8.1f} ms  (sum of the steps' queue + compute: "
          f"{steps_ms:.1f} ms)")
    print(f"  {'client latency':<34}{client_ms:8.1f} ms  (wire + client work: {client_ms - ensemble_ms:.1f} ms)")
    print(f"  the last response's {len(last.masks)} masks, in this process (medians of 21): packed bits "
          f"{pack_ms:.2f} ms to pack (the postprocess's part), {unpack_ms:.2f} ms to unpack (the SDK's); "
          f"COCO RLE {rle_encode_ms:.1f} ms to encode, {rle_decode_ms:.1f} ms to decode")
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
        w.writerow([desc, "bit packing (in-process)", "", f"{pack_ms:.2f}"])
        w.writerow([desc, "bit unpacking (in-process)", "", f"{unpack_ms:.2f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
