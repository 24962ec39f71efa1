"""The tritonserver command line `samtriton serve` launches: secure defaults, cache, ports."""

from __future__ import annotations

from pathlib import Path

from samtriton import server
from samtriton.cli import build_parser


def _command(**kwargs):
    opts = server.ServerOptions(Path("/models"), 18000, 18001, 18002, admin_header="k:secret", **kwargs)
    return server.server_command(opts, home=Path("/triton"))


def test_secure_defaults_and_ports():
    cmd = _command()
    assert cmd[0] == "/triton/bin/tritonserver"
    args = set(cmd[1:])
    assert {
        "--model-repository=/models",
        "--http-port=18000",
        "--grpc-port=18001",
        "--metrics-port=18002",
        "--model-control-mode=none",
        "--grpc-restricted-protocol=model-repository,shared-memory:k=secret",
        "--http-restricted-api=model-repository,shared-memory:k=secret",
        f"--exit-timeout-secs={server.EXIT_TIMEOUT_S}",
        "--strict-readiness=true",
        "--backend-directory=/triton/backends",
        "--cache-directory=/triton/caches",
    } <= args
    assert f"--cache-config=local,size={server.DEFAULT_CACHE_BYTES}" in args


def test_cache_can_be_turned_off_and_admin_key_is_random_per_launch():
    assert not any(a.startswith("--cache-config") for a in _command(cache_bytes=0))
    a, b = server.ServerOptions(Path("/m")), server.ServerOptions(Path("/m"))
    assert a.admin_header != b.admin_header and len(a.admin_header.split(":")[1]) == 32


def test_build_cli_batching_options_reach_the_configs(tmp_path):
    from samtriton.build.configs import model_configs
    from samtriton.build.repository import TEMPLATE_WEIGHTS
    from samtriton.variants import get_variant
    from samtriton.cli import serving_options

    args = build_parser().parse_args([
        "build", "--random-weights", "--out", str(tmp_path), "--encoder-max-batch-size", "8",
        "--encoder-preferred-batch-sizes", "4", "8", "--decoder-max-batch-size", "32", "--decoder-queue-delay-us", "500",
    ])
    cfgs = model_configs([get_variant("mobilesam")], {"mobilesam": TEMPLATE_WEIGHTS}, serving_options(args))
    assert cfgs["mobilesam_image_encoder"].max_batch_size == 8
    assert list(cfgs["mobilesam_image_encoder"].dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfgs["mobilesam_mask_decoder"].max_batch_size == 32
    assert cfgs["mobilesam_mask_decoder"].dynamic_batching.max_queue_delay_microseconds == 500
    assert cfgs["mobilesam_image_encoder"].model_warmup and cfgs["mobilesam_mask_decoder"].model_warmup
    args = build_parser().parse_args(["build", "--random-weights", "--out", str(tmp_path), "--no-cpu-warmup"])
    cfgs = model_configs([get_variant("mobilesam")], {"mobilesam": TEMPLATE_WEIGHTS}, serving_options(args))
    assert not any(cfg.model_warmup for cfg in cfgs.values())


def test_build_cli_embedding_handoff_options_reach_the_configs(tmp_path):
    from samtriton import spec
    from samtriton.build.configs import model_configs
    from samtriton.build.repository import TEMPLATE_WEIGHTS
    from samtriton.cli import serving_options
    from samtriton.variants import get_variant

    def configs(*extra):
        args = build_parser().parse_args(["build", "--random-weights", "--out", str(tmp_path), *extra])
        return model_configs([get_variant("mobilesam")], {"mobilesam": TEMPLATE_WEIGHTS}, serving_options(args))

    def sam_passes(cfgs):
        decoder_step = cfgs[spec.ENSEMBLE].ensemble_scheduling.step[2]
        return {spec.IMAGE_EMBEDDINGS_NAME, spec.EMBEDDING_HANDLE.name} & set(decoder_step.input_map)

    spare = configs("--embedding-handoff-spare-slots", "4")
    assert spare["mobilesam_image_embedding"].parameters["embedding_handoff_spare_slots"].string_value == "4"
    assert sam_passes(spare) == {spec.EMBEDDING_HANDLE.name}
    off = configs("--no-embedding-handoff")
    assert off["mobilesam_image_embedding"].parameters["embedding_handoff_spare_slots"].string_value == "0"
    assert sam_passes(off) == {spec.IMAGE_EMBEDDINGS_NAME}
    assert spec.EMBEDDING_HANDLE.name not in {t.name for t in off["mobilesam_mask_decoder"].input}
    assert sam_passes(configs("--target", "gpu")) == {spec.IMAGE_EMBEDDINGS_NAME}


def test_serve_cli_defaults_match_the_documented_ports():
    args = build_parser().parse_args(["serve", "--model-repository", "/m"])
    assert (args.http_port, args.grpc_port, args.metrics_port) == (8000, 8001, 8002)
    assert args.cache_size_mb * 2**20 == server.DEFAULT_CACHE_BYTES


def test_remove_shm_regions_unlinks_only_python_backend_regions(tmp_path, monkeypatch):
    monkeypatch.setattr(server, "SHM_DIR", tmp_path)
    left = f"{server.SHM_REGION_PREFIX}1111"
    gone = f"{server.SHM_REGION_PREFIX}2222"  # already removed by Triton
    other = "samtriton_not_a_region"
    for name in (left, other):
        (tmp_path / name).write_bytes(b"x")
    removed = server.remove_shm_regions({left, gone, other, f"{server.SHM_REGION_PREFIX}../{other}"})
    assert removed == [left]
    assert sorted(p.name for p in tmp_path.iterdir()) == [other]
