"""Checkpoint download: a real HTTP server on loopback stands in for the publisher."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import subprocess
import threading
from functools import partial
from pathlib import Path

import pytest

from samtriton.build.download import (
    MIRROR_ENV,
    CheckpointDownloadError,
    cache_dir,
    resolve_checkpoint,
)
from samtriton.variants import get_variant
from tests.conftest import SAMTRITON


class _Handler(http.server.SimpleHTTPRequestHandler):
    hits: list[str]

    def do_GET(self):  # noqa: N802 (the stdlib's name)
        self.hits.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture()
def publisher(tmp_path):
    """(base URL, folder it serves, list of requested paths)."""
    folder = tmp_path / "published"
    folder.mkdir()
    hits: list[str] = []
    handler = type("Handler", (_Handler,), {"hits": hits})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder, hits
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return cache_dir()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mobile_sam.pt"


def test_url_is_downloaded_verified_and_cached(publisher, cache):
    base, folder, hits = publisher
    data = b"checkpoint bytes " * 100_000
    (folder / "mobile_sam.pt").write_bytes(data)
    variant = get_variant("mobilesam")
    url = f"{base}/mobile_sam.pt"

    path = resolve_checkpoint(variant, url, sha256=_sha(data), log=lambda m: None)
    assert path.read_bytes() == data and path.is_relative_to(cache)
    assert hits == ["/mobile_sam.pt"]
    # A second build reuses the verified copy without asking the server.
    assert resolve_checkpoint(variant, url, sha256=_sha(data), log=lambda m: None) == path
    assert hits == ["/mobile_sam.pt"]
    # No partial files are left behind.
    assert [p.name for p in path.parent.iterdir()] == ["mobile_sam.pt"]


def test_checksum_mismatch_keeps_nothing(publisher, cache):
    base, folder, _ = publisher
    (folder / "mobile_sam.pt").write_bytes(b"tampered")
    with pytest.raises(CheckpointDownloadError, match="sha256 mismatch") as info:
        resolve_checkpoint(get_variant("mobilesam"), f"{base}/mobile_sam.pt", sha256="0" * 64,
                           log=lambda m: None)
    assert "nothing was kept" in str(info.value)
    assert not any(p.is_file() for p in cache.rglob("*"))


def test_official_url_uses_the_recorded_sha256(publisher, cache, monkeypatch):
    """No --checkpoint: the official file (here from a mirror) must match the sha256
    samtriton records for it; a random file does not, and is refused."""
    base, folder, hits = publisher
    monkeypatch.setenv(MIRROR_ENV, base)
    (folder / "sam_vit_b_01ec64.pth").write_bytes(b"not the official file")
    with pytest.raises(CheckpointDownloadError, match="ec2df62732614e57"):
        resolve_checkpoint(get_variant("sam-vit-b"), None, log=lambda m: None)
    assert hits == ["/sam_vit_b_01ec64.pth"]


def test_variant_without_recorded_sha256_needs_one(publisher, cache, monkeypatch):
    base, folder, _ = publisher
    monkeypatch.setenv(MIRROR_ENV, base)
    variant = get_variant("efficientvit-sam-l1")
    data = b"l1 weights"
    (folder / variant.checkpoint_file).write_bytes(data)
    with pytest.raises(CheckpointDownloadError, match="--checkpoint-sha256"):
        resolve_checkpoint(variant, None, log=lambda m: None)
    path = resolve_checkpoint(variant, None, sha256=_sha(data), log=lambda m: None)
    assert path.read_bytes() == data


def test_offline_and_missing_file_errors(publisher, cache):
    base, _, _ = publisher
    variant = get_variant("mobilesam")
    with pytest.raises(CheckpointDownloadError, match="Without internet access"):
        resolve_checkpoint(variant, _closed_port_url(), log=lambda m: None)
    with pytest.raises(CheckpointDownloadError, match="HTTP 404"):
        resolve_checkpoint(variant, f"{base}/nothing.pt", log=lambda m: None)
    with pytest.raises(CheckpointDownloadError, match="does not exist"):
        resolve_checkpoint(variant, "/no/such/mobile_sam.pt", log=lambda m: None)
    with pytest.raises(CheckpointDownloadError, match="64 hex digits"):
        resolve_checkpoint(variant, f"{base}/x.pt", sha256="abc", log=lambda m: None)


def test_build_from_a_url_end_to_end(publisher, random_checkpoints, tmp_path):
    """`samtriton build --model efficientvit-sam-l0` with no --checkpoint, the
    official URL redirected to the loopback mirror, verified by the sha256 given."""
    base, folder, hits = publisher
    variant = get_variant("efficientvit-sam-l0")
    data = random_checkpoints[variant.name].read_bytes()
    (folder / variant.checkpoint_file).write_bytes(data)
    env_extra = {MIRROR_ENV: base, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    out = tmp_path / "repo"
    cmd = [*SAMTRITON, "build", "--model", variant.name, "--out", str(out)]

    env = {**os.environ, **env_extra}
    # The recorded sha256 is the published file's: the random stand-in is refused.
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert refused.returncode == 1 and "sha256 mismatch" in refused.stderr, refused.stderr
    assert not out.exists()

    proc = subprocess.run([*cmd, "--checkpoint-sha256", _sha(data)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "efficientvit_l0_image_encoder" / "1" / "model.onnx").stat().st_size > 1_000_000
    weights = (out / "sam_efficientvit_l0" / "config.pbtxt").read_text()
    assert f"sha256={_sha(data)}" in weights
    assert hits == [f"/{variant.checkpoint_file}"] * 2
