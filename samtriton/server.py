"""Run the real tritonserver 2.51 that the nvidia-pytriton wheel carries, without Docker.

The wheel ships the server binary, the python backend and one python stub per
Python version.  The backend looks for its stub beside itself, so the server
tree is copied once into the virtual environment (`<venv>/share/samtriton/`)
with the stub of the running Python put in place; site-packages stays as
installed.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from samtriton import spec

TRITON_VERSION = "2.51.0"  # the server inside nvidia-pytriton 0.7.0; tritonclient is pinned to match
EXIT_TIMEOUT_S = 30
UNREADY_EXIT_CODE = 3
# Python-backend shared memory: one region per model instance, grown in steps;
# an encoder input is 12 MB, a request's full-size masks can be tens of MB.
SHM_DEFAULT_BYTES = 16 * 1024 * 1024
SHM_GROWTH_BYTES = 16 * 1024 * 1024
# Triton's response cache, for repositories built with --encoder-response-cache
# (the image encoders' outputs, ~4 MiB each): 256 MiB holds about 60 images.
# The embedding cache `sam` uses is the image_embedding models' own.
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024


class TritonNotInstalled(RuntimeError):
    pass


def _pytriton_dirs() -> tuple[Path, Path]:
    try:
        import pytriton
    except ImportError as e:
        raise TritonNotInstalled("nvidia-pytriton is not installed: run `make setup`") from e
    package = Path(pytriton.__file__).parent
    return package / "tritonserver", package.parent / "nvidia_pytriton.libs"


def triton_home() -> Path:
    """A runnable copy of the server tree, made on first use."""
    source, _ = _pytriton_dirs()
    home = Path(sys.prefix) / "share" / "samtriton" / f"tritonserver-{TRITON_VERSION}"
    stub = home / "backends" / "python" / "triton_python_backend_stub"
    if stub.exists():
        return home
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub_source = source / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub_source.exists():
        raise TritonNotInstalled(f"no python backend stub for Python {py} in {source}")
    staging = home.with_name(home.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("python_backend_stubs"))
    shutil.copy2(stub_source, staging / "backends" / "python" / "triton_python_backend_stub")
    shutil.rmtree(home, ignore_errors=True)
    staging.rename(home)
    return home


def server_env() -> dict[str, str]:
    """The server's environment: the wheel's libraries, and this venv's python first on PATH
    (the stub runs `python` models with it, so they import numpy, onnxruntime, samtriton)."""
    _, libs = _pytriton_dirs()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return env


@dataclass
class ServerOptions:
    model_repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    # Header name:value that unlocks the model-repository and shared-memory
    # APIs; a random one per launch unless given.
    admin_header: str = field(default_factory=lambda: f"samtriton-admin-key:{secrets.token_hex(16)}")
    exit_timeout_s: int = EXIT_TIMEOUT_S
    cache_bytes: int = DEFAULT_CACHE_BYTES  # 0: no response cache
    # Overrides the repository's embedding cache size (MiB, 0: off); None keeps it.
    embedding_cache_mb: float | None = None
    log_verbose: int = 0
    extra_args: tuple[str, ...] = ()
    # An installed Triton tree (bin/, backends/, caches/), e.g. /opt/tritonserver
    # in the NGC image; None: the one the nvidia-pytriton wheel carries.
    triton_home: Path | None = None
    # `run_foreground` stops the server and exits UNREADY_EXIT_CODE when one of
    # its python stubs dies, or when it has been ready and then stays not ready
    # this long (0: neither).  Triton 2.51 restarts neither, so only a restart
    # from outside (systemd, Kubernetes) brings the service back.
    unready_exit_s: float = 15.0
    # --http-max-input-size (bytes): Triton 2.51 (the embedded server) has no
    # such flag and caps HTTP input at 64 MiB; newer releases (the NGC image)
    # take it, and the container sets it.
    http_max_input_bytes: int | None = None
    # While this file exists the preprocess refuses new requests (see
    # `run_foreground`); one per launch.
    drain_file: Path = field(default_factory=lambda: Path(tempfile.gettempdir())
                             / f"samtriton-drain-{secrets.token_hex(8)}")


def server_command(opts: ServerOptions, home: Path | None = None) -> list[str]:
    home = home or opts.triton_home or triton_home()
    header_key, _, header_value = opts.admin_header.partition(":")
    restricted = f"model-repository,shared-memory:{header_key}={header_value}"
    return [
        str(home / "bin" / "tritonserver"),
        f"--model-repository={Path(opts.model_repository).resolve()}",
        f"--backend-directory={home / 'backends'}",
        f"--cache-directory={home / 'caches'}",
        f"--http-port={opts.http_port}",
        f"--grpc-port={opts.grpc_port}",
        f"--metrics-port={opts.metrics_port}",
        # Secure defaults: no model loading/unloading over the API, and the
        # repository and shared-memory APIs only with the admin header.
        "--model-control-mode=none",
        f"--grpc-restricted-protocol={restricted}",
        f"--http-restricted-api={restricted}",
        f"--exit-timeout-secs={opts.exit_timeout_s}",
        "--strict-readiness=true",
        f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
        f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}",
        *([f"--cache-config=local,size={opts.cache_bytes}"] if opts.cache_bytes > 0 else []),
        *([f"--http-max-input-size={opts.http_max_input_bytes}"] if opts.http_max_input_bytes else []),
        f"--log-verbose={opts.log_verbose}",
        *opts.extra_args,
    ]


def _die_with_parent():
    # Tie the server's life to its parent: a killed test run or CLI must not
    # leave a tritonserver (and its python stubs) behind.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start(opts: ServerOptions, stdout=None, stderr=None) -> subprocess.Popen:
    env = dict(os.environ) if opts.triton_home else server_env()
    env[spec.DRAIN_FILE_ENV] = str(opts.drain_file)  # the python stubs inherit it
    if opts.embedding_cache_mb is not None:
        env[spec.EMBEDDING_CACHE_MB_ENV] = f"{opts.embedding_cache_mb:g}"
    opts.drain_file.unlink(missing_ok=True)
    return subprocess.Popen(
        server_command(opts),
        env=env,
        stdout=stdout,
        stderr=stderr,
        preexec_fn=_die_with_parent,
        start_new_session=True,  # a terminal's Ctrl-C reaches us once; we forward it
    )


_SAMPLE = re.compile(r'^(\w+)\{([^}]*)\}\s+([0-9.eE+-]+)$')
_MODEL_LABEL = re.compile(r'model="([^"]*)"')


def in_flight_from_metrics(text: str) -> tuple[int, tuple[int, ...]]:
    """Requests inside the ensembles, from Triton's Prometheus metrics text, and
    the counters it was computed from.

    Triton 2.51 keeps no in-flight count for ensembles, and records a python
    model's per-request error responses as successes, so: requests that got
    through a preprocess (its successes less its own error responses, from
    samtriton's counter) less those that ended since: in the postprocess, as a
    successful `sam_encode*` (which ends at the image embedding), or with an
    error in the image embedding or decoder (Triton's failures, e.g.
    queue-full rejections, and the python models' error responses; an
    encoder's errors reach its requests through the image embedding).  A request still inside the
    preprocess is not counted; callers watch the counters over a short interval.
    `sam_everything` requests are counted by that model's own gauge.
    """
    totals: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match:
            continue
        name, labels, value = match.groups()
        model = _MODEL_LABEL.search(labels)
        if model is None:
            continue
        key = (name, spec.role_of(model.group(1)) or "")
        totals[key] = totals.get(key, 0.0) + float(value)

    def count(metric: str, role: str) -> int:
        return int(totals.get((metric, role), 0))

    ok, failed, errors = "nv_inference_request_success", "nv_inference_request_failure", spec.REQUEST_ERRORS_METRIC
    entered = count(ok, spec.PREPROCESS) - count(errors, spec.PREPROCESS)
    finished = (
        count(ok, spec.POSTPROCESS) + count(failed, spec.POSTPROCESS)
        + count(ok, spec.ENCODE_ENSEMBLE)
        + sum(count(failed, role) + count(errors, role) for role in (spec.IMAGE_EMBEDDING, spec.MASK_DECODER))
    )
    everything = count(spec.EVERYTHING_IN_FLIGHT_METRIC, spec.EVERYTHING)
    return max(0, entered - finished) + everything, (entered, finished, count(ok, spec.ENSEMBLE),
                                                     count(failed, spec.ENSEMBLE), everything)


def ensemble_in_flight(metrics_port: int, host: str = "127.0.0.1") -> tuple[int, tuple[int, ...]]:
    with urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=5) as r:
        return in_flight_from_metrics(r.read().decode())


def drain(metrics_port: int, timeout_s: float, settle_s: float = 1.0, poll_s: float = 0.1) -> bool:
    """Wait until no request is in flight and the counters stay still for
    `settle_s`; False if `timeout_s` passed first."""
    deadline = time.monotonic() + timeout_s
    quiet_since, last = None, None
    while time.monotonic() < deadline:
        try:
            busy, counters = ensemble_in_flight(metrics_port)
        except (OSError, ValueError):
            return True  # no metrics to read: the server is not serving
        now = time.monotonic()
        if busy == 0 and counters == last:
            quiet_since = quiet_since or now
            if now - quiet_since >= settle_s:
                return True
        else:
            quiet_since = None
        last = counters
        time.sleep(poll_s)
    return False


def _stub_args(server_pid: int) -> dict[int, list[bytes]]:
    """pid -> command line of each python backend stub the server started."""
    children = set()
    # A child belongs to the thread that started it: read every thread's list.
    for task in Path(f"/proc/{server_pid}/task").glob("*"):
        try:
            children.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    stubs = {}
    for pid in sorted(children):
        try:
            args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"triton_python_backend_stub") and len(args) > 1:
            stubs[pid] = args
    return stubs


def python_stubs(server_pid: int) -> dict[int, str]:
    """pid -> model instance folder of the python backend stubs the server started."""
    return {pid: Path(args[1].decode(errors="replace")).parent.parent.name
            for pid, args in _stub_args(server_pid).items()}


SHM_DIR = Path("/dev/shm")
SHM_REGION_PREFIX = "triton_python_backend_shm_region_"


def _is_region_name(name: str) -> bool:
    return name.startswith(SHM_REGION_PREFIX) and "/" not in name


def stub_shm_regions(server_pid: int) -> set[str]:
    """Names (under /dev/shm) of the shared-memory regions the server's python stubs use."""
    # A stub's command line: <stub> <model.py> <its region's name> <region size> ...
    names = set()
    for args in _stub_args(server_pid).values():
        name = args[2].decode(errors="replace") if len(args) > 2 else ""
        if _is_region_name(name):
            names.add(name)
    return names


def remove_shm_regions(names: set[str]) -> list[str]:
    """Unlink those of `names` still in /dev/shm, once their server has exited; the removed ones.

    Measured with Triton 2.51: when a stub has died (killed, OOM) and a request reached it
    before the server stopped, the server leaves that stub's region (32 MB here) behind; a
    Kubernetes pod's /dev/shm (an emptyDir) outlives the container's restarts, so each such
    crash would hold its region until the pod goes."""
    removed = []
    for name in sorted(filter(_is_region_name, names)):
        try:
            (SHM_DIR / name).unlink()
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class Watchdog:
    """What `run_foreground` watches once the server has been ready.

    Measured with Triton 2.51: a python stub that dies (killed, OOM) is not
    restarted, yet the model and the server keep answering READY while every
    request to that model fails with "Stub process ... is not healthy".  So
    the stubs themselves are watched; a model that goes NOT READY is caught by
    the readiness check.  Either way the server is beyond repair from inside.
    """

    def __init__(self, server_pid: int, opts: ServerOptions, period_s: float = 2.0):
        self.server_pid, self.opts, self.period_s = server_pid, opts, period_s
        self.stubs: dict[int, str] = {}
        # The stubs' shared-memory regions, for `remove_shm_regions` once the server is gone.
        self.shm_regions: set[str] = set()
        self.was_ready, self.unready_since, self.next_check = False, None, time.monotonic()

    def check(self) -> str | None:
        now = time.monotonic()
        if self.opts.unready_exit_s <= 0 or now < self.next_check:
            return None
        self.next_check = now + self.period_s
        if self.was_ready:
            dead = [f"{model} (pid {pid})" for pid, model in self.stubs.items() if not _alive(pid)]
            if dead:
                return (f"python stub of {', '.join(dead)} died; Triton 2.51 does not restart it and keeps "
                        "reporting READY while that model's requests fail")
        if is_ready(self.opts.http_port, timeout=5.0):
            if not self.was_ready:
                self.stubs = python_stubs(self.server_pid)
                self.shm_regions = stub_shm_regions(self.server_pid)
            self.was_ready, self.unready_since = True, None
        elif self.was_ready:
            self.unready_since = self.unready_since or now
            if now - self.unready_since >= self.opts.unready_exit_s:
                return f"the server has not been ready for {self.opts.unready_exit_s:.0f} s"
        return None


def run_foreground(opts: ServerOptions, log=lambda msg: print(f"samtriton: {msg}", file=sys.stderr)) -> int:
    """Run tritonserver until it exits or SIGINT/SIGTERM arrives.

    On the first signal, new requests are refused (the preprocess sees the
    drain file and answers UNAVAILABLE) and in-flight ensemble requests are
    drained before Triton is told to stop: Triton 2.51, once stopping, refuses
    the next step of an ensemble request that is already running, so
    signalling it at once fails them.  A second signal is passed on at once.
    """
    proc = start(opts)
    signals: list[int] = []

    def on_signal(signum, _frame):
        signals.append(signum)
        if len(signals) > 1 and proc.poll() is None:
            proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    watchdog = Watchdog(proc.pid, opts)
    try:
        while proc.poll() is None and not signals:
            time.sleep(0.2)
            problem = watchdog.check()
            if problem and not signals:
                log(f"{problem}: stopping, exit code {UNREADY_EXIT_CODE}, so that a supervisor restarts the server")
                stop(proc)
                return UNREADY_EXIT_CODE
        if proc.poll() is None:
            log(f"{signal.Signals(signals[0]).name}: refusing new requests, finishing those in flight")
            opts.drain_file.touch()
            try:
                if not drain(opts.metrics_port, timeout_s=opts.exit_timeout_s):
                    log(f"requests still in flight after {opts.exit_timeout_s} s; stopping anyway")
                if proc.poll() is None and len(signals) == 1:
                    proc.send_signal(signal.SIGTERM)
                return proc.wait()
            finally:
                opts.drain_file.unlink(missing_ok=True)
        return proc.wait()
    finally:
        if proc.poll() is not None:  # never while the server could still be using them
            removed = remove_shm_regions(watchdog.shm_regions)
            if removed:
                log(f"removed {len(removed)} shared-memory region(s) the server left in {SHM_DIR}: {', '.join(removed)}")


def is_ready(http_port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{http_port}/v2/health/ready", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def wait_ready(proc: subprocess.Popen, http_port: int, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tritonserver exited with code {proc.returncode} before it was ready")
        if is_ready(http_port):
            return
        time.sleep(0.25)
    raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen, timeout_s: float = EXIT_TIMEOUT_S + 15) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
