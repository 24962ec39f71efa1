"""The Docker image, checked without a Docker engine: hadolint, the pinned base,
the non-root user, and the command line its entrypoint launches."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from samtriton import container, server

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def test_hadolint_passes():
    proc = subprocess.run([str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_image_is_a_pinned_ngc_release_after_the_2026_03_fixes():
    text = DOCKERFILE.read_text()
    (image,) = re.findall(r"^ARG TRITON_IMAGE=(\S+)$", text, re.M)
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3", image)
    assert match, image
    assert (int(match[1]), int(match[2])) >= (26, 3)
    assert "FROM ${TRITON_IMAGE}" in text
    # Every other base is pinned to a version too.
    for base in re.findall(r"^FROM (\S+)", text, re.M):
        assert base == "${TRITON_IMAGE}" or re.search(r":\d", base), base


def test_runs_as_non_root_with_the_container_entrypoint():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["python3", "-m", "samtriton.container"\]$', text, re.M)
    assert "samtriton build --target gpu" in text
    assert re.search(r"^EXPOSE 8000 8001 8002$", text, re.M)


def test_container_launches_tritonserver_with_secure_flags(tmp_path):
    env = {"SAMTRITON_ADMIN_KEY": "k3y", "SAMTRITON_CACHE_SIZE_MB": "512", "SAMTRITON_HTTP_PORT": "9000"}
    opts = container.options_from_env(tmp_path, env)
    cmd = server.server_command(opts)
    assert cmd[0] == "/opt/tritonserver/bin/tritonserver"
    assert f"--model-repository={tmp_path.resolve()}" in cmd
    assert "--backend-directory=/opt/tritonserver/backends" in cmd
    assert "--model-control-mode=none" in cmd
    assert "--grpc-restricted-protocol=model-repository,shared-memory:samtriton-admin-key=k3y" in cmd
    assert "--http-restricted-api=model-repository,shared-memory:samtriton-admin-key=k3y" in cmd
    assert f"--exit-timeout-secs={server.EXIT_TIMEOUT_S}" in cmd
    assert f"--cache-config=local,size={512 * 1024 * 1024}" in cmd
    assert opts.embedding_cache_mb == 512  # the image_embedding models' own cache
    assert "--http-port=9000" in cmd and "--grpc-port=8001" in cmd and "--metrics-port=8002" in cmd
    assert f"--http-max-input-size={40 * 1024 * 1024}" in cmd


def test_working_repository_links_the_image_files(tmp_path):
    source = tmp_path / "image_repo"
    (source / "enc" / "1").mkdir(parents=True)
    (source / "enc" / "1" / "model.onnx").write_bytes(b"onnx")
    (source / "enc" / "config.pbtxt").write_text("name: 'enc'")
    work = tmp_path / "work"
    (work / "stale").mkdir(parents=True)
    container.link_tree(source, work)
    assert (work / "enc" / "1" / "model.onnx").is_symlink()
    assert (work / "enc" / "1" / "model.onnx").read_bytes() == b"onnx"
    assert not (work / "stale").exists()
    # Plans are written beside the links, in real folders.
    (work / "enc" / "1" / "model.plan").write_bytes(b"plan")
    assert not (source / "enc" / "1" / "model.plan").exists()
