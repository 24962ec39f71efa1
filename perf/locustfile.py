"""Locust load test of the `sam` ensemble over gRPC, with tritonclient, mixed workload.

    make load                     # starts a server, runs this headless, writes perf/results/locust_*.csv
    .venv-load/bin/locust -f perf/locustfile.py --headless -u 16 -r 4 -t 2m \\
        --host 127.0.0.1:8001 --csv perf/results/locust --p95-bound-ms 30000

Tasks (weights): a new image with many boxes (1), a cached image with one box
(6), a bad request (1) that must come back INVALID_ARG, which counts as a
success; anything else that fails is an unexpected error.  Exit code 1 on any
unexpected error, or when the p95 of the good requests exceeds --p95-bound-ms.
"""

from __future__ import annotations

import atexit
import io
import itertools
import logging
import os
import sys
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent

# grpc's blocking calls must yield to gevent, or locust's users run one at a time.
grpc_gevent.init_gevent()

import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from locust import User, between, events, task  # noqa: E402
from locust.stats import StatsEntry  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samtriton import spec  # noqa: E402  (numpy only: no torch, no server code)
from samtriton.sample_image import sample_scene  # noqa: E402

OUTPUTS = f"{spec.SCORES.name},{spec.MASKS_RLE.name}"
BAD_PREFIX = "bad:"
_seeds = itertools.count(10_000)


@events.init_command_line_parser.add_listener
def _arguments(parser):
    parser.add_argument("--p95-bound-ms", type=float, default=0.0,
                        help="exit 1 when the p95 latency of good requests exceeds this (0: no bound)")
    parser.add_argument("--new-image-boxes", type=int, default=12, help="boxes per new-image request")


def _jpeg(seed: int, w: int = 640, h: int = 480) -> bytes:
    scene, _ = sample_scene(w, h, seed=seed)
    buf = io.BytesIO()
    scene.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _boxes(rng, n, w=640, h=480) -> np.ndarray:
    x0, y0 = rng.uniform(0, w * 0.7, n), rng.uniform(0, h * 0.7, n)
    return np.stack([x0, y0, x0 + rng.uniform(16, w * 0.3, n), y0 + rng.uniform(16, h * 0.3, n)], 1).astype(np.float32)


CACHED_IMAGES = [_jpeg(seed) for seed in range(4)]


def _inputs(image: bytes, boxes: np.ndarray, box_dtype: str = spec.BOXES.wire_dtype):
    img = grpcclient.InferInput(spec.IMAGE.name, [1], spec.IMAGE.wire_dtype)
    img.set_data_from_numpy(np.array([image], dtype=np.object_))
    b = grpcclient.InferInput(spec.BOXES.name, list(boxes.shape), box_dtype)
    b.set_data_from_numpy(boxes)
    return [img, b]


class SamGrpcUser(User):
    wait_time = between(0.0, 0.3)

    def on_start(self):
        self.client = grpcclient.InferenceServerClient(self.host)
        self.rng = np.random.default_rng(next(_seeds))

    def on_stop(self):
        self.client.close()

    def _call(self, name: str, inputs, expect_invalid: bool = False):
        outputs = [grpcclient.InferRequestedOutput(n) for n in OUTPUTS.split(",")]
        started = time.perf_counter()
        error, length = None, 0
        try:
            result = self.client.infer(spec.ENSEMBLE, inputs, outputs=outputs,
                                       parameters={"outputs": OUTPUTS}, client_timeout=600)
            length = sum(len(r) for r in result.as_numpy(spec.MASKS_RLE.name))
            if expect_invalid:
                error = AssertionError("a bad request was accepted")
        except InferenceServerException as e:
            if not (expect_invalid and e.status() == "StatusCode.INVALID_ARGUMENT"):
                error = e
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=length, exception=error, context={},
        )

    @task(1)
    def new_image_many_boxes(self):
        n = self.environment.parsed_options.new_image_boxes
        self._call(f"new image, {n} boxes", _inputs(_jpeg(next(_seeds)), _boxes(self.rng, n)))

    @task(6)
    def cached_image_one_box(self):
        image = CACHED_IMAGES[int(self.rng.integers(len(CACHED_IMAGES)))]
        self._call("cached image, 1 box", _inputs(image, _boxes(self.rng, 1)))

    @task(1)
    def bad_request(self):
        kind = int(self.rng.integers(3))
        if kind == 0:
            self._call(f"{BAD_PREFIX} not an image", _inputs(b"\x00not an image", _boxes(self.rng, 1)), True)
        elif kind == 1:
            boxes = _boxes(self.rng, 2)
            boxes[1, 0] = np.nan
            self._call(f"{BAD_PREFIX} NaN box", _inputs(CACHED_IMAGES[0], boxes), True)
        else:
            self._call(f"{BAD_PREFIX} FP64 boxes", _inputs(CACHED_IMAGES[0], _boxes(self.rng, 1).astype(np.float64),
                                                            "FP64"), True)


@events.quit.add_listener
def _exit_before_teardown(exit_code, **_kwargs):
    """Leave with locust's exit code once it has written its reports, skipping
    the interpreter's teardown: there, grpc channels that the garbage collector
    closes under gevent can block forever (seen here: the summary printed, then
    the process hung).  Registered last, so it runs first of the exit handlers."""
    def leave():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)

    atexit.register(leave)


@events.quitting.add_listener
def _verdict(environment, **_kwargs):
    stats = environment.stats
    good = StatsEntry(stats, "good requests", "")
    bad_ok = 0
    for (name, _method), entry in stats.entries.items():
        if name.startswith(BAD_PREFIX):
            bad_ok += entry.num_requests - entry.num_failures
        else:
            good.extend(entry)
    p95 = good.get_response_time_percentile(0.95) if good.num_requests else 0.0
    bound = environment.parsed_options.p95_bound_ms
    unexpected = stats.total.num_failures
    print(f"samtriton load: {good.num_requests} good requests (p95 {p95:.0f} ms), "
          f"{bad_ok} bad requests answered INVALID_ARG, {unexpected} unexpected errors")
    if unexpected:
        environment.process_exit_code = 1
    if bound and p95 > bound:
        print(f"samtriton load: p95 {p95:.0f} ms exceeds the bound of {bound:.0f} ms")
        environment.process_exit_code = 1
    if good.num_requests == 0:
        print("samtriton load: no good request completed")
        environment.process_exit_code = 1
