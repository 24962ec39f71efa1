"""Shared fixtures: a random checkpoint in the official layout, a repository built
from it by the real CLI, and a real tritonserver serving it on free ports."""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# The installed console script, as users run it.
SAMTRITON = [str(Path(sys.executable).parent / "samtriton")]
CHECKPOINT_SEED = 0


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    from samtriton.build.checkpoint import write_random_checkpoint
    from samtriton.build.registry import get_variant

    path = tmp_path_factory.mktemp("checkpoint") / "mobile_sam.pt"
    return write_random_checkpoint(get_variant("mobilesam"), path, seed=CHECKPOINT_SEED)


@pytest.fixture(scope="session")
def built_repository(tmp_path_factory, random_checkpoint) -> tuple[Path, str]:
    """`samtriton build --checkpoint` on the random checkpoint; returns (dir, build output)."""
    out = tmp_path_factory.mktemp("repo") / "model_repository"
    proc = subprocess.run(
        [*SAMTRITON, "build", "--model", "mobilesam", "--checkpoint", str(random_checkpoint), "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout + proc.stderr


@dataclass
class RunningServer:
    http_port: int
    grpc_port: int
    metrics_port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def url(self, protocol: str) -> str:
        return self.grpc_url if protocol == "grpc" else self.http_url

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


@pytest.fixture(scope="session")
def triton_server(built_repository, tmp_path_factory):
    from samtriton import server

    repo, _ = built_repository
    ports = server.free_ports(3)
    log_path = tmp_path_factory.mktemp("server") / "tritonserver.log"
    with open(log_path, "wb") as log:
        proc = server.start(server.ServerOptions(repo, *ports), stdout=log, stderr=log)
    running = RunningServer(*ports, proc=proc, log_path=log_path)
    try:
        server.wait_ready(proc, ports[0])
    except Exception:
        server.stop(proc)
        pytest.fail(f"tritonserver did not become ready:\n{running.log_tail()}")
    yield running
    server.stop(proc)


@pytest.fixture(scope="session")
def reference_predictor(random_checkpoint):
    """The upstream MobileSAM predictor on the same checkpoint (in-process PyTorch)."""
    from mobile_sam import SamPredictor, sam_model_registry

    sam = sam_model_registry["vit_t"](checkpoint=str(random_checkpoint))
    sam.eval()  # after loading, as upstream's README does: TinyViT caches attention biases on eval()
    return SamPredictor(sam)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def random_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    x0 = rng.uniform(0, width * 0.8, n)
    y0 = rng.uniform(0, height * 0.8, n)
    x1 = np.minimum(x0 + rng.uniform(8, width * 0.6, n), width)
    y1 = np.minimum(y0 + rng.uniform(8, height * 0.6, n), height)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    inter = (a & b).sum(axis=1)
    union = (a | b).sum(axis=1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))
