"""Embedding cache: a 1-box request on a cached image vs on a new image, in one run.

    .venv/bin/python perf/cache_ratio.py --model-repository var/model_repository

Starts a server, sends 1-box requests on images it has never seen (encoder
runs) and on one image it has (encoder answered from Triton's response
cache), prints medians, the ratio and the encoder's counters over the cached
phase, and writes perf/results/cache.csv.  Exits non-zero if the encoder ran
during the cached phase.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from samtriton import spec
from samtriton.client import SamClient
from samtriton.variants import DEFAULT_MODEL, get_variant

sys.path.insert(0, str(Path(__file__).parent))
from latency import RESULTS, jpeg, machine, model_stats, serving  # noqa: E402

# The encoder behind `sam`, the ensemble SamClient calls by default.
ENCODER = spec.default_names(get_variant(DEFAULT_MODEL).slug).image_encoder


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", default="var/model_repository")
    parser.add_argument("--new-images", type=int, default=5)
    parser.add_argument("--cached-requests", type=int, default=15)
    args = parser.parse_args()

    rng = np.random.default_rng(0)

    def one_box():
        x0, y0 = rng.uniform(0, 800), rng.uniform(0, 500)
        return [[x0, y0, x0 + rng.uniform(40, 200), y0 + rng.uniform(40, 180)]]

    with serving(args.model_repository) as url:
        with SamClient(url) as client:
            client.segment(jpeg(999), one_box())  # warm-up: first calls pay one-off costs
            new_images = [jpeg(seed) for seed in range(args.new_images)]
            new = [timed(lambda img=img: client.segment(img, one_box())) for img in new_images]
            cached_image = jpeg(0)  # served above, so its embedding is in the cache
            before = model_stats(url, ENCODER)
            cached = [timed(lambda: client.segment(cached_image, one_box())) for _ in range(args.cached_requests)]
            time.sleep(0.2)  # Triton records the last hit just after answering
            after = model_stats(url, ENCODER)

    delta = {k: after[k] - before[k] for k in after}
    new_ms, cached_ms = statistics.median(new), statistics.median(cached)
    ratio = new_ms / cached_ms
    desc = machine()
    print(f"machine: {desc}\nMobileSAM, 1024x683 JPEG, 1 box per request, gRPC, medians")
    print(f"  new image     ({len(new):>2} requests) {new_ms:8.1f} ms")
    print(f"  cached image  ({len(cached):>2} requests) {cached_ms:8.1f} ms")
    print(f"  ratio new / cached: {ratio:.1f}x")
    print(f"  {ENCODER} over the cached requests: {delta}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "cache.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["machine", "new_image_ms", "cached_image_ms", "ratio", "encoder_executions_during_cached",
                    "cache_hits_during_cached"])
        w.writerow([desc, f"{new_ms:.1f}", f"{cached_ms:.1f}", f"{ratio:.2f}", delta["executions"],
                    delta["cache_hits"]])
    return 0 if delta["executions"] == 0 and delta["cache_hits"] == len(cached) else 1


if __name__ == "__main__":
    sys.exit(main())
