"""The Docker image's entrypoint: engines for this node's GPU, then tritonserver.

1. The image holds a GPU-target repository (`samtriton build --target gpu`),
   read-only.  A working copy is made of links to it, so plans can be added
   without copying the ONNX files.
2. Engines come from the engine cache volume when one was built for this GPU
   model, TensorRT version, ONNX file and profile; otherwise they are built here
   (minutes), checked by the accuracy gate and stored in the cache.
3. tritonserver starts with the same secure flags as `samtriton serve`
   (model control none, restricted repository and shared-memory APIs, exit
   timeout), and SIGTERM drains in-flight ensemble requests before Triton stops.

Settings come from the environment (documented in docker/README.md).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from samtriton import server

REPOSITORY_ENV = "SAMTRITON_MODEL_REPOSITORY"
CACHE_ENV = "SAMTRITON_ENGINE_CACHE"
WORK_ENV = "SAMTRITON_WORK_DIR"
TRITON_HOME = Path("/opt/tritonserver")
# Every setting the entrypoint reads (docker/README.md; the Kubernetes test
# checks the Deployment sets no other).
ENV_VARS = (
    REPOSITORY_ENV, CACHE_ENV, WORK_ENV, "SAMTRITON_FP32", "SAMTRITON_ADMIN_KEY", "SAMTRITON_CACHE_SIZE_MB",
    "SAMTRITON_HTTP_PORT", "SAMTRITON_GRPC_PORT", "SAMTRITON_METRICS_PORT", "SAMTRITON_TRITON_HOME",
    "SAMTRITON_HTTP_MAX_INPUT_MB",
)


def link_tree(source: Path, target: Path) -> None:
    """`target` mirrors `source` with real folders and links to its files."""
    if target.exists():
        shutil.rmtree(target)
    for folder, _, files in os.walk(source):
        rel = Path(folder).relative_to(source)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            os.symlink(Path(folder, name).resolve(), target / rel / name)


def options_from_env(repository: Path, env=os.environ) -> server.ServerOptions:
    admin = env.get("SAMTRITON_ADMIN_KEY")
    return server.ServerOptions(
        model_repository=repository,
        http_port=int(env.get("SAMTRITON_HTTP_PORT", "8000")),
        grpc_port=int(env.get("SAMTRITON_GRPC_PORT", "8001")),
        metrics_port=int(env.get("SAMTRITON_METRICS_PORT", "8002")),
        cache_bytes=int(float(env.get("SAMTRITON_CACHE_SIZE_MB", "1024")) * 1024 * 1024),
        embedding_cache_mb=float(env.get("SAMTRITON_CACHE_SIZE_MB", "1024")),
        triton_home=Path(env.get("SAMTRITON_TRITON_HOME", str(TRITON_HOME))),
        # An encoded image (the preprocess refuses more than 32 MiB) and its boxes.
        http_max_input_bytes=int(float(env.get("SAMTRITON_HTTP_MAX_INPUT_MB", "40")) * 1024 * 1024),
        **({"admin_header": f"samtriton-admin-key:{admin}"} if admin else {}),
    )


def main(argv=None) -> int:
    source = Path(os.environ.get(REPOSITORY_ENV, "/opt/samtriton/model_repository"))
    cache = Path(os.environ.get(CACHE_ENV, "/engines"))
    work = Path(os.environ.get(WORK_ENV, "/tmp/samtriton")) / "model_repository"
    log = lambda msg: print(f"samtriton: {msg}", file=sys.stderr, flush=True)  # noqa: E731

    link_tree(source, work)
    from samtriton.build.engines import EngineBuildError, build_repository_engines

    try:
        built = build_repository_engines(work, cache, fp16=os.environ.get("SAMTRITON_FP32") != "1", log=log)
    except EngineBuildError as e:
        log(str(e))
        return 1
    log(f"{built} engine(s) built for this GPU; cache: {cache}")
    return server.run_foreground(options_from_env(work), log=log)


if __name__ == "__main__":
    sys.exit(main())
