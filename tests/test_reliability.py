"""Reliability, measured on a real tritonserver: backpressure under a burst, a
soak at saturation (failures, memory, /dev/shm), and a crashed python stub.

A dedicated server runs the default variant of the test repository with small
queues (so that a burst overflows them in seconds); the stub-crash test kills
one of its python stubs, so it runs last on its own server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from samtriton import server, spec
from samtriton.build.configs import ServingOptions, WeightsInfo, model_configs
from samtriton.build.repository import write_configs
from samtriton.client import (
    InferenceFailedError,
    InvalidInputError,
    SamClient,
    ServerBusyError,
    ServerUnavailableError,
)
from samtriton.sample_image import sample_scene
from samtriton.serving import embedding_arena
from samtriton.variants import get_variant
from tests.conftest import SAMTRITON, decoder_prompt_inputs, encode, infer, random_boxes

pytestmark = pytest.mark.integration

SOAK_SECONDS = float(os.environ.get("SAMTRITON_SOAK_SECONDS", "60"))
# RSS growth allowed over the soak, after warm-up, for the server and its stubs together.
MAX_RSS_GROWTH_MB = float(os.environ.get("SAMTRITON_SOAK_MAX_RSS_GROWTH_MB", "150"))
WARMUP_SECONDS = 15
NAMES = spec.model_names("mobilesam")


@pytest.fixture(scope="module")
def small_queue_repository(built_repository, tmp_path_factory) -> Path:
    """The default variant of the test repository, with an encoder that takes
    one image per call, at most 2 new images let through to it (the default
    mechanism: no Triton queue policy), no embedding cache, and sam_everything
    serving one request while one more waits (configs regenerated, ONNX reused)."""
    source, _ = built_repository
    repo = tmp_path_factory.mktemp("small_queue") / "repo"
    variant = get_variant("mobilesam")
    options = ServingOptions(encoder_max_batch_size=1, encoder_max_misses=2, embedding_cache_mb=0,
                             everything_instances=1, everything_max_queue_size=1)
    configs = model_configs([variant], {variant.name: WeightsInfo("test", random=True)}, options)
    for name in configs:  # hard links: the ONNX files are not copied
        shutil.copytree(source / name, repo / name, copy_function=os.link)
    write_configs(repo, configs)
    return repo


@pytest.fixture(scope="module")
def small_queue_server(small_queue_repository, tmp_path_factory):
    ports = server.free_ports(3)
    log = tmp_path_factory.mktemp("sq") / "server.log"
    with open(log, "wb") as f:
        proc = server.start(server.ServerOptions(small_queue_repository, *ports, cache_bytes=0), stdout=f, stderr=f)
    try:
        server.wait_ready(proc, ports[0])
    except Exception:
        server.stop(proc)
        pytest.fail(log.read_text()[-3000:])
    yield ports, proc
    server.stop(proc)


def _new_image(seed: int) -> tuple[bytes, np.ndarray]:
    scene, _ = sample_scene(480, 320, seed=seed)
    return encode(scene, "JPEG", quality=85), random_boxes(np.random.default_rng(seed), 2, 480, 320)


def _segment_once(grpc_port: int, image: bytes, boxes: np.ndarray, timeout_s: float = 120.0):
    """One request on a client of its own, closed before this returns: a client left to the
    garbage collector (its failed call's traceback keeps it in a reference cycle) would close
    its gRPC channel inside a later test, wherever the collector happens to run."""
    with SamClient(f"127.0.0.1:{grpc_port}", timeout_s=timeout_s) as client:
        return client.segment(image, boxes)


def test_burst_beyond_the_queue_is_refused_fast(small_queue_server):
    (http, grpc, _), _ = small_queue_server
    requests = [_new_image(1000 + i) for i in range(12)]

    def one(req):
        started = time.perf_counter()
        try:
            with SamClient(f"127.0.0.1:{grpc}") as client:
                client.segment(*req)
            return "ok", time.perf_counter() - started
        except ServerBusyError:
            return "busy", time.perf_counter() - started

    with ThreadPoolExecutor(len(requests)) as pool:
        outcomes = list(pool.map(one, requests))
    ok = [t for o, t in outcomes if o == "ok"]
    busy = [t for o, t in outcomes if o == "busy"]
    print(f"\nburst of {len(requests)}: {len(ok)} served (max {max(ok):.1f} s), {len(busy)} refused "
          f"UNAVAILABLE (max {max(busy or [0]):.2f} s)")
    assert busy and ok
    # Refusals come at once, not after waiting behind the queue.
    assert max(busy) < min(5.0, max(ok))
    assert server.is_ready(http)
    with SamClient(f"127.0.0.1:{grpc}") as client:  # and it serves again
        assert len(client.segment(*_new_image(7)).scores) == 2


def test_everything_burst_beyond_its_queue_is_refused_fast(small_queue_server):
    """sam_everything here serves one request and lets one wait: of 4 sent at once, 2 are refused
    at once with ServerBusyError (Triton's queue policy, before the model sees them) and 2 are
    served, with the masks the same request gets alone; a box request is served right after."""
    (http, grpc, _), _ = small_queue_server
    scene, _ = sample_scene(480, 320, seed=41)
    image = encode(scene, "PNG")
    # 64 points: 8 decoder requests one after another, seconds on 2 cores, so the burst overlaps.
    params = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)

    def one(_):
        started = time.perf_counter()
        try:
            with SamClient(f"127.0.0.1:{grpc}", timeout_s=300) as client:
                return client.segment_everything(image, **params), time.perf_counter() - started
        except ServerBusyError as e:
            assert "maximum queue size" in str(e).lower()
            return None, time.perf_counter() - started

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(one, range(4)))
    served = [(r, t) for r, t in outcomes if r is not None]
    refused = [t for r, t in outcomes if r is None]
    print(f"\neverything burst of 4: {len(served)} served ({', '.join(f'{t:.1f}' for _, t in served)} s), "
          f"{len(refused)} refused ({', '.join(f'{t:.2f}' for t in refused)} s)")
    assert len(served) == 2 and len(refused) == 2
    assert max(refused) < min(t for _, t in served)
    with SamClient(f"127.0.0.1:{grpc}") as client:
        alone = client.segment_everything(image, **params)
        assert len(client.segment(*_new_image(8)).scores) == 2
    assert len(alone) > 0  # thresholds at 0: the masks are compared, not only their count
    for result, _ in served:
        assert result.rles == alone.rles
        np.testing.assert_array_equal(result.scores, alone.scores)
    assert server.is_ready(http)


def test_a_handle_outlived_by_its_slot_fails_unavailable_never_with_another_image(small_queue_server):
    """No embedding cache: each new image's slot is released at once, and reused once
    every handle out for it has been read.  With all of them out, image_embedding reuses
    the slot released longest ago anyway, and that handle's decoder request fails
    UNAVAILABLE ("evicted") instead of decoding another image."""
    from samtriton.serving.decoder_batch import sample_requests

    (_, grpc, _), _ = small_queue_server
    url = f"127.0.0.1:{grpc}"
    slots = ServingOptions().embedding_handoff_spare_slots  # the arena's slots, with no cache
    image = {seed: np.array([_new_image(seed)[0]], dtype=object) for seed in range(3000, 3000 + slots + 4)}
    # Every test image has the same size, so one geometry serves them all.
    geometry = infer(url, spec.ENCODE_ENSEMBLE, {spec.IMAGE.name: image[3000]},
                     [spec.IMAGE_GEOMETRY.name, spec.IMAGE_EMBEDDINGS_NAME])[spec.IMAGE_GEOMETRY.name]

    def embed(seed, output):  # a miss: one slot written
        inputs = {spec.IMAGE.name: image[seed], spec.IMAGE_GEOMETRY.name: geometry}
        return infer(url, NAMES.image_embedding, inputs, [output])[output]

    tensor = embed(3000, spec.IMAGE_EMBEDDINGS_NAME)
    request = sample_requests(np.random.default_rng(3), images=np.repeat(tensor, 2, axis=0))[0]
    prompts = decoder_prompt_inputs(request)

    def decode(inputs):
        return infer(url, NAMES.mask_decoder, {**inputs, **prompts},
                     [spec.IOU_PREDICTIONS_NAME])[spec.IOU_PREDICTIONS_NAME]

    expected = decode({spec.IMAGE_EMBEDDINGS_NAME: tensor})
    handles = [embed(seed, spec.EMBEDDING_HANDLE.name) for seed in range(3000, 3000 + slots)]  # every slot out
    decode({spec.EMBEDDING_HANDLE.name: handles[1]})  # read: its slot is free to reuse
    embed(3000 + slots, spec.IMAGE_EMBEDDINGS_NAME)  # takes handles[1]'s slot, not the older handles[0]'s
    np.testing.assert_allclose(decode({spec.EMBEDDING_HANDLE.name: handles[0]}), expected, rtol=0, atol=1e-5)
    # Three more handed out: into the two slots read, then one taken by force, the
    # slot released longest ago (handles[2]'s).
    for seed in range(3001 + slots, 3004 + slots):
        embed(seed, spec.EMBEDDING_HANDLE.name)
    with pytest.raises(Exception) as info:
        decode({spec.EMBEDDING_HANDLE.name: handles[2]})
    assert info.value.status() == "StatusCode.UNAVAILABLE" and "evicted" in info.value.message(), info.value
    decode({spec.EMBEDDING_HANDLE.name: handles[3]})  # the others are still there


def _rss_mb(pid: int) -> float:
    """RSS of `pid` and its descendants (the python stubs), in MB."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
            todo.extend(int(c) for c in open(f"/proc/{p}/task/{p}/children").read().split())
        except OSError:
            continue
    return total


def _triton_shm() -> set[str]:
    """The python backend's shared-memory regions and image_embedding's embedding arenas."""
    return {p.name for p in Path("/dev/shm").iterdir()
            if "triton_python_backend" in p.name or p.name.startswith(embedding_arena.PREFIX)}


def test_soak_at_saturation(small_queue_repository, tmp_path):
    """Clients at the server's capacity for SAMTRITON_SOAK_SECONDS (60 in CI; `make
    soak` runs longer): no failed or hung request, bounded memory, /dev/shm clean."""
    shm_before = _triton_shm()
    ports = server.free_ports(3)
    with open(tmp_path / "server.log", "wb") as f:
        proc = server.start(server.ServerOptions(small_queue_repository, *ports, cache_bytes=0), stdout=f, stderr=f)
    try:
        server.wait_ready(proc, ports[0])
        images = [_new_image(2000 + i) for i in range(6)]
        counts = {"ok": 0, "busy": 0, "failed": 0}
        # Two clients keep the encoder (one image per call, queue of 2) saturated
        # without overflowing it; a third sends at the limit now and then.
        deadline = 0.0

        def client_loop(k):
            i = k
            with SamClient(f"127.0.0.1:{ports[1]}", timeout_s=120) as client:
                while time.monotonic() < deadline:
                    try:
                        result = client.segment(*images[i % len(images)])
                        counts["ok" if len(result.scores) == 2 else "failed"] += 1
                    except ServerBusyError:
                        counts["busy"] += 1
                        time.sleep(0.2)
                    except Exception:
                        counts["failed"] += 1
                    i += 3

        # Warm-up: the same load for a while, so that the shared-memory pools and
        # OpenVINO's per-shape kernels reach their working size before RSS is taken.
        deadline = time.monotonic() + WARMUP_SECONDS
        with ThreadPoolExecutor(3) as pool:
            for f in [pool.submit(client_loop, k) for k in range(3)]:
                f.result(timeout=150)
        rss_start, rss_peak = _rss_mb(proc.pid), 0.0
        deadline = time.monotonic() + SOAK_SECONDS
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(client_loop, k) for k in range(3)]
            while any(not f.done() for f in futures):
                rss_peak = max(rss_peak, _rss_mb(proc.pid))
                time.sleep(1.0)
            for f in futures:
                f.result(timeout=150)  # a hung request would fail here
        rss_end = _rss_mb(proc.pid)
        print(f"\nsoak {SOAK_SECONDS:.0f} s: {counts}; RSS server+stubs {rss_start:.0f} -> {rss_end:.0f} MB "
              f"(peak {rss_peak:.0f} MB)")
        assert counts["failed"] == 0 and counts["ok"] > 0
        assert rss_end - rss_start < MAX_RSS_GROWTH_MB
        assert server.is_ready(ports[0])
    finally:
        server.stop(proc)
    # The python backend's shared-memory regions and the embedding arenas are gone with the server.
    leftover = _triton_shm() - shm_before
    assert not leftover, leftover


def test_killed_stub_makes_serve_exit_for_a_restart(small_queue_repository, tmp_path):
    """Measured with Triton 2.51: a python stub killed with SIGKILL is not restarted,
    the server and the model keep answering READY, and every request that needs
    that model fails with "Stub process ... is not healthy" (INTERNAL).
    `samtriton serve` watches its stubs and exits non-zero, so a supervisor
    (systemd, Kubernetes) restarts the whole server."""
    proc, (http, grpc, _) = _serve(small_queue_repository)
    try:
        server.wait_ready(proc, http)
        time.sleep(3)  # the watchdog records the stubs once the server is ready
        triton_pid = _server_pid(proc.pid)
        stubs = [pid for pid, model in server.python_stubs(triton_pid).items()
                 if model == NAMES.image_encoder]
        assert stubs, "no python stub found for the image encoder"
        regions = server.stub_shm_regions(triton_pid)
        assert len(regions) == len(server.python_stubs(triton_pid)), regions
        os.kill(stubs[0], signal.SIGKILL)
        killed_at = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            # A request that reaches the dead stub before the watchdog stops the server makes
            # Triton 2.51 leave the stub's shared-memory region behind when it stops.
            late = pool.submit(_segment_once, grpc, *_new_image(8))
            code = proc.wait(timeout=60)
            # The stub's "not healthy" (INTERNAL), or the server gone before the request got there.
            with pytest.raises((InferenceFailedError, ServerUnavailableError)):
                late.result(timeout=60)
        output = proc.stdout.read()
        print(f"\nsamtriton serve exited {code} {time.monotonic() - killed_at:.1f} s after the kill; "
              f"{'it removed the region left' if 'shared-memory region' in output else 'no region was left'}")
        assert code == server.UNREADY_EXIT_CODE, output[-3000:]
        assert f"python stub of {NAMES.image_encoder}" in output
        assert not server.is_ready(http)  # and the server is gone, not left half-working
        # ... and so is its shared memory, whether or not Triton left the killed stub's region.
        assert not {r for r in regions if (server.SHM_DIR / r).exists()}, output[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)


def _serve(repo: Path) -> tuple[subprocess.Popen, list[int]]:
    """`samtriton serve` as users run it, on free ports, output captured."""
    ports = server.free_ports(3)
    proc = subprocess.Popen(
        [*SAMTRITON, "serve", "--model-repository", str(repo), "--http-port", str(ports[0]),
         "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--cache-size-mb", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, ports


def _server_pid(serve_pid: int) -> int:
    """The tritonserver started by `samtriton serve` (its child)."""
    for task in Path(f"/proc/{serve_pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            if open(f"/proc/{child}/cmdline", "rb").read().split(b"\0")[0].endswith(b"tritonserver"):
                return int(child)
    raise AssertionError("no tritonserver child")


def test_without_the_watchdog_a_dead_stub_fails_requests_but_looks_ready(small_queue_repository, tmp_path):
    """The Triton 2.51 behaviour the watchdog exists for, measured: after the
    kill, READY and LIVE stay 200 and requests fail INTERNAL, for good."""
    ports = server.free_ports(3)
    with open(tmp_path / "server.log", "wb") as f:
        proc = server.start(server.ServerOptions(small_queue_repository, *ports, cache_bytes=0), stdout=f, stderr=f)
    try:
        server.wait_ready(proc, ports[0])
        (stub,) = [pid for pid, model in server.python_stubs(proc.pid).items() if model == NAMES.image_encoder]
        regions = server.stub_shm_regions(proc.pid)
        os.kill(stub, signal.SIGKILL)
        time.sleep(2)
        for _ in range(2):
            with pytest.raises(InferenceFailedError, match="not healthy"):
                _segment_once(ports[1], *_new_image(9), timeout_s=60)  # "not healthy" comes at once
        assert server.is_ready(ports[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/live", timeout=5) as r:
            assert r.status == 200
        assert not any(model == NAMES.image_encoder for model in server.python_stubs(proc.pid).values())
    finally:
        server.stop(proc)
    # Triton leaves the killed stub's shared-memory region behind (what `samtriton serve` removes).
    left = server.remove_shm_regions(regions)
    assert len(left) == 1, left


def test_sigterm_finishes_in_flight_refuses_new_and_exits_promptly(small_queue_repository):
    """SIGTERM with a request in flight: it completes, a request sent during the
    drain is refused with UNAVAILABLE, and the server exits well inside the
    exit timeout, although bad requests (python error responses, which Triton
    2.51 counts as successes) went before."""
    proc, (http, grpc, _) = _serve(small_queue_repository)
    try:
        server.wait_ready(proc, http)
        with SamClient(f"127.0.0.1:{grpc}") as client:
            for bad in (b"not an image", b""):
                with pytest.raises(InvalidInputError):
                    client.segment(bad, np.array([[1, 1, 9, 9]], np.float32))
        image, _ = _new_image(31)
        many = random_boxes(np.random.default_rng(31), 40, 480, 320)
        with ThreadPoolExecutor(2) as pool:
            in_flight = pool.submit(_segment_once, grpc, image, many)
            time.sleep(1.0)  # inside the encoder / decoder by now
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            time.sleep(0.5)
            with pytest.raises(ServerUnavailableError, match="shutting down"):
                _segment_once(grpc, *_new_image(32))
            result = in_flight.result(timeout=120)
        assert len(result.scores) == 40
        code = proc.wait(timeout=server.EXIT_TIMEOUT_S + 30)
        after_last = time.monotonic() - signalled
        print(f"\nSIGTERM: in-flight request completed, new one refused; exit {code} {after_last:.1f} s after the signal")
        assert code == 0
        assert after_last < server.EXIT_TIMEOUT_S  # the drain ended on its own, not by timeout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
