"""The GPU target without a GPU: configs, engine profiles, precision rules, the
TensorRT-ready decoder graph, and the repository `build --target gpu` writes.
Engine builds and the accuracy gate need TensorRT and a GPU: skipped here."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from samtriton import spec
from samtriton.build import trt_compat
from samtriton.build.configs import ServingOptions, WeightsInfo, model_configs, parse_pbtxt, to_pbtxt
from samtriton.build.engines import (
    cache_key,
    decoder_profile,
    encoder_profile,
    keep_fp32,
    profile_from_config,
)
from samtriton.variants import MODEL_REGISTRY, get_variant
from tests.conftest import SAMTRITON

GPU = ServingOptions.for_target("gpu")
ALL = list(MODEL_REGISTRY.values())


def _gpu_configs(options=GPU):
    weights = {v.name: WeightsInfo("w", random=False) for v in ALL}
    return model_configs(ALL, weights, options)


def test_gpu_configs_are_tensorrt_models_with_ragged_decoder():
    cfgs = _gpu_configs()
    for v in ALL:
        names = spec.model_names(v.slug)
        enc, dec = cfgs[names.image_encoder], cfgs[names.mask_decoder]
        for cfg in (enc, dec):
            assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
            assert [g.kind for g in cfg.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
            assert cfg.HasField("dynamic_batching")
        assert list(enc.input[0].dims) == [3, v.encoder_size, v.encoder_size]
        # The embedding cache in front of the engine: a CPU python model calling it through BLS.
        emb = cfgs[names.image_embedding]
        assert emb.backend == "python" and [g.kind for g in emb.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
        assert emb.parameters["image_encoder"].string_value == names.image_encoder
        ragged = {t.name: (list(t.dims), list(t.reshape.shape)) for t in dec.input if t.allow_ragged_batch}
        assert ragged == {spec.PROMPT_COORDS_NAME: ([-1, -1, 2], [-1]), spec.PROMPT_LABELS_NAME: ([-1, -1], [-1]),
                          spec.MODEL_MASK_INPUTS_NAME: ([-1, 256, 256], [-1]), spec.HAS_MASK_INPUT_NAME: ([-1], [])}
        counts = {tuple(b.target_name): (b.kind, tuple(b.source_input)) for b in dec.batch_input}
        kind = mc.BatchInput.BATCH_ACCUMULATED_ELEMENT_COUNT
        assert counts == {(spec.LABELS_ACCUMULATED_NAME,): (kind, (spec.PROMPT_LABELS_NAME,)),
                          (spec.MASKS_ACCUMULATED_NAME,): (kind, (spec.MODEL_MASK_INPUTS_NAME,))}
        (batch_output,) = dec.batch_output
        assert batch_output.kind == mc.BatchOutput.BATCH_SCATTER_WITH_INPUT_SHAPE
        # Scattered by a per-prompt input: one element per prompt of the request.
        assert list(batch_output.source_input) == [spec.HAS_MASK_INPUT_NAME]
        assert set(batch_output.target_name) == {spec.LOW_RES_MASKS_NAME, spec.IOU_PREDICTIONS_NAME}
        assert [list(t.dims) for t in dec.output] == [[-1, 4, 256, 256], [-1, 4]]  # every mask token
        tokens = spec.gpu_prompt_tokens(GPU.limits.max_points)
        assert dec.parameters["prompt_tokens"].string_value == str(tokens)
        assert cfgs[names.preprocess].parameters["pad_prompt_tokens"].string_value == str(tokens)
        # The CPU-side steps are the very same models as on the CPU target without the
        # embedding handoff (the GPU's decoder is a TensorRT model: it takes the tensor).
        cpu = model_configs([v], {v.name: WeightsInfo("w", random=False)}, ServingOptions(embedding_handoff=False))
        for name in (names.preprocess, names.image_embedding, spec.POSTPROCESS, names.ensemble, names.encode_ensemble):
            if name == spec.POSTPROCESS:
                continue  # lists the variants it serves
            gpu_cfg, cpu_cfg = mc.ModelConfig(), mc.ModelConfig()
            gpu_cfg.CopyFrom(cfgs[name])
            cpu_cfg.CopyFrom(cpu[name])
            for cfg in (gpu_cfg, cpu_cfg):
                cfg.ClearField("instance_group")
                cfg.parameters.pop("pad_prompt_tokens", None)  # the GPU's fixed token count, checked above
                cfg.parameters.pop("decode_threads", None)  # more threads to keep a GPU fed
                cfg.parameters.pop("max_misses_in_flight", None)  # new images in flight: 128 on the GPU, 32 on CPU
            assert gpu_cfg == cpu_cfg, name
        assert cfgs[names.preprocess].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    for cfg in cfgs.values():  # Triton's own schema reads them back unchanged
        assert parse_pbtxt(to_pbtxt(cfg)) == cfg


def test_profiles_cover_what_triton_may_send():
    cfgs = _gpu_configs()
    names = spec.model_names("efficientvit_l0")
    enc = profile_from_config(cfgs[names.image_encoder], 512)
    lo, opt, hi = enc.shapes[spec.PIXEL_VALUES_NAME]
    assert lo == (1, 3, 512, 512) and hi == (GPU.encoder_max_batch_size, 3, 512, 512) and lo <= opt <= hi
    dec = profile_from_config(cfgs[names.mask_decoder], 512)
    tokens = spec.gpu_prompt_tokens(GPU.limits.max_points)
    most = GPU.decoder_max_batch_size * GPU.limits.max_boxes  # every request of a full batch at the limit
    assert dec.shapes[spec.PROMPT_LABELS_NAME] == ((tokens,), (tokens * 32,), (tokens * most,))
    assert dec.shapes[spec.PROMPT_COORDS_NAME][2] == (2 * tokens * most,)
    assert dec.shapes[spec.HAS_MASK_INPUT_NAME] == ((1,), (32,), (most,)) and most >= 1024
    # At least the placeholder, at most one mask input per prompt.
    assert dec.shapes[spec.MODEL_MASK_INPUTS_NAME][0] == (256 * 256,)
    assert dec.shapes[spec.MODEL_MASK_INPUTS_NAME][2] == (256 * 256 * most,)
    assert dec.shapes[spec.IMAGE_EMBEDDINGS_NAME][2][0] == GPU.decoder_max_batch_size
    for counts in (spec.LABELS_ACCUMULATED_NAME, spec.MASKS_ACCUMULATED_NAME):
        assert dec.shapes[counts][2] == (GPU.decoder_max_batch_size,)
    small = decoder_profile(max_batch_size=1, max_prompts=300, opt_prompts=500, tokens=3)
    assert small.shapes[spec.PROMPT_LABELS_NAME] == ((3,), (900,), (900,))
    assert encoder_profile(1024, 1).shapes[spec.PIXEL_VALUES_NAME][1][0] == 1


def test_cache_key_changes_with_what_makes_an_engine_different():
    p = encoder_profile(1024, 8)
    base = cache_key("NVIDIA H100 80GB HBM3", "10.13.0", "ab" * 32, p, True)
    assert base == cache_key("NVIDIA H100 80GB HBM3", "10.13.0", "ab" * 32, p, True)
    others = {
        cache_key("NVIDIA L4", "10.13.0", "ab" * 32, p, True),
        cache_key("NVIDIA H100 80GB HBM3", "10.14.0", "ab" * 32, p, True),
        cache_key("NVIDIA H100 80GB HBM3", "10.13.0", "cd" * 32, p, True),
        cache_key("NVIDIA H100 80GB HBM3", "10.13.0", "ab" * 32, encoder_profile(1024, 4), True),
        cache_key("NVIDIA H100 80GB HBM3", "10.13.0", "ab" * 32, p, False),
    }
    assert base not in others and len(others) == 5


@pytest.fixture(scope="module")
def gpu_repository(tmp_path_factory):
    """`samtriton build --target gpu` for MobileSAM and EfficientViT-SAM-L0 (random weights)."""
    out = tmp_path_factory.mktemp("gpu") / "repo"
    proc = subprocess.run([*SAMTRITON, "build", "--target", "gpu", "--model", "mobilesam", "efficientvit-sam-l0",
                           "--random-weights", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_gpu_build_writes_onnx_for_engines_and_checks_them(gpu_repository):
    repo, log = gpu_repository
    for slug in ("mobilesam", "efficientvit_l0"):
        names = spec.model_names(slug)
        for model in (names.image_encoder, names.mask_decoder):
            assert sorted(p.name for p in (repo / model / "1").iterdir()) == ["model.onnx"]
            assert 'platform: "tensorrt_plan"' in (repo / model / "config.pbtxt").read_text()
        assert (repo / names.preprocess / "1" / "model.py").exists()
    assert log.count("graphs checked for TensorRT") == 2
    assert "samtriton build-engines --model-repository" in log


def test_ragged_decoder_graph_equals_the_indexed_one(gpu_repository):
    """Same prompts of every kind, same images: the GPU graph (flat ragged prompt
    tensors + running counts, as Triton's TensorRT backend sends them) gives
    what the CPU graph gives, for all four mask tokens."""
    from samtriton.build.onnx_export import all_mask_tokens
    from samtriton.serving import decoder_batch
    from samtriton.serving.onnx_runtime import make_session

    gpu_repo, _ = gpu_repository
    names = spec.model_names("efficientvit_l0")
    ragged = make_session(str(gpu_repo / names.mask_decoder / "1" / "model.onnx"))
    requests = decoder_batch.sample_requests(np.random.default_rng(3))
    got = ragged.run(None, decoder_batch.ragged_feeds(requests, spec.gpu_prompt_tokens(GPU.limits.max_points)))
    # The reference: the same random weights (seed 0) through the CPU target's
    # indexed export.
    from samtriton.build.checkpoint import load_model, write_random_checkpoint
    from samtriton.build.onnx_export import export_decoder

    variant = get_variant("efficientvit-sam-l0")
    tmp = gpu_repo.parent / "ref"
    ckpt = write_random_checkpoint(variant, tmp / variant.checkpoint_file, seed=0)
    export_decoder(load_model(variant, ckpt), tmp / "decoder.onnx")
    indexed = make_session(str(tmp / "decoder.onnx"))
    want = indexed.run(None, all_mask_tokens(decoder_batch.stack(requests, [False] * len(requests)).feeds))
    assert got[0].shape == want[0].shape == (sum(r.prompts for r in requests), 4, 256, 256)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=1e-6)


def test_accuracy_gate_inputs_fit_the_engine_profile(gpu_repository):
    """The gate feeds the decoder every prompt kind: shapes inside the profile the
    engine is built with, and the fp32 ONNX graph (the gate's reference) runs them."""
    from samtriton.build.configs import parse_pbtxt
    from samtriton.build.accuracy_gate import decoder_feeds
    from samtriton.build.engines import _onnx_runner

    repo, _ = gpu_repository
    names = spec.model_names("mobilesam")
    cfg = parse_pbtxt((repo / names.mask_decoder / "config.pbtxt").read_text())
    tokens = int(cfg.parameters["prompt_tokens"].string_value)
    feeds = decoder_feeds(tokens)
    profile = profile_from_config(cfg, 1024)
    assert set(feeds) == set(profile.shapes)
    for name, (lo, _, hi) in profile.shapes.items():
        shape = feeds[name].shape
        assert all(a <= b <= c for a, b, c in zip(lo, shape, hi)), (name, lo, shape, hi)
    out = _onnx_runner(repo / names.mask_decoder / "1" / "model.onnx")(feeds)
    prompts = int(feeds[spec.HAS_MASK_INPUT_NAME].shape[0])
    assert out[spec.LOW_RES_MASKS_NAME].shape == (prompts, 4, 256, 256) and prompts >= 10
    assert feeds[spec.HAS_MASK_INPUT_NAME].any() and not feeds[spec.HAS_MASK_INPUT_NAME].all()


def test_exported_graphs_pass_the_tensorrt_checks(gpu_repository):
    repo, _ = gpu_repository
    for slug in ("mobilesam", "efficientvit_l0"):
        names = spec.model_names(slug)
        enc = onnx.load(str(repo / names.image_encoder / "1" / "model.onnx"))
        dec = onnx.load(str(repo / names.mask_decoder / "1" / "model.onnx"))
        assert trt_compat.problems(enc, ()) == []
        assert trt_compat.problems(dec, trt_compat.DECODER_VALUE_INPUTS) == []


def _graph(nodes, inputs, outputs):
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)])


def test_tensorrt_checks_catch_the_known_failures():
    labels = helper.make_tensor_value_info("labels", TensorProto.INT32, [-1])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    # Upstream SAM decoders: OneHot on point labels feeding a Tile count.
    onehot = _graph([
        helper.make_node("Constant", [], ["depth"], value=helper.make_tensor("d", TensorProto.INT32, [], [4])),
        helper.make_node("Constant", [], ["vals"], value=helper.make_tensor("v", TensorProto.INT32, [2], [0, 1])),
        helper.make_node("OneHot", ["labels", "depth", "vals"], ["oh"], name="onehot"),
        helper.make_node("ReduceSum", ["oh"], ["reps"], keepdims=0, name="sum"),
        helper.make_node("Cast", ["reps"], ["reps64"], to=TensorProto.INT64, name="cast"),
        helper.make_node("Tile", ["x", "reps64"], ["y"], name="tile"),
    ], [x, labels], [y])
    found = trt_compat.problems(onehot, ("labels",))
    assert any("OneHot cannot compute shape tensors" in f for f in found)
    assert any(f.startswith("tile: its shape input") for f in found)
    # A reshape sized by box values, without OneHot: still refused.
    by_value = _graph([
        helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64, name="c"),
        helper.make_node("ReduceMax", ["xi"], ["n"], keepdims=1, name="m"),
        helper.make_node("Reshape", ["x", "n"], ["y"], name="r"),
    ], [x], [y])
    assert any(f.startswith("r: its shape input") for f in trt_compat.problems(by_value, ("x",)))
    # Through Shape() only dimensions flow: allowed.
    by_shape = _graph([
        helper.make_node("Shape", ["x"], ["s"], name="s"),
        helper.make_node("Reshape", ["x", "s"], ["y"], name="r"),
    ], [x], [y])
    assert trt_compat.problems(by_shape, ("x",)) == []


def test_precision_rules_keep_the_fragile_layers_in_fp32(gpu_repository):
    repo, _ = gpu_repository
    dec = onnx.load(str(repo / "efficientvit_l0_mask_decoder" / "1" / "model.onnx")).graph.node
    enc = onnx.load(str(repo / "efficientvit_l0_image_encoder" / "1" / "model.onnx")).graph.node
    mobile = onnx.load(str(repo / "mobilesam_image_encoder" / "1" / "model.onnx")).graph.node
    softmax = [n.name for n in dec if n.op_type == "Softmax"]
    assert len(softmax) == 7 and all(keep_fp32(n) for n in softmax)  # 2 layers x 3 + final attention
    for nodes in (dec, enc, mobile):
        norms = [n.name for n in nodes if n.op_type in ("LayerNormalization", "ReduceMean")]
        assert norms and all(keep_fp32(n) for n in norms), [n for n in norms if not keep_fp32(n)]
    assert any("mask_downscaling" in n.name for n in dec if n.op_type == "ReduceMean")  # the mask input's norms
    attention = [n.name for n in enc if "/context_module/" in n.name]
    assert attention and all(keep_fp32(n) for n in attention)
    # Not everything: the convolutions outside attention run in fp16.
    convs = [n.name for n in enc if n.op_type == "Conv"]
    assert sum(keep_fp32(n) for n in convs) < len(convs) // 2


def test_serve_refuses_a_gpu_repository(gpu_repository):
    repo, _ = gpu_repository
    proc = subprocess.run([*SAMTRITON, "serve", "--model-repository", str(repo)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "GPU-target repository" in proc.stderr


def _has_gpu_and_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return shutil.which("nvidia-smi") is not None


@pytest.mark.skipif(not _has_gpu_and_tensorrt(), reason="needs an NVIDIA GPU and the tensorrt package")
def test_engines_build_and_pass_the_accuracy_gate(gpu_repository, tmp_path):
    from samtriton.build.engines import build_repository_engines

    repo, _ = gpu_repository
    lines = []
    assert build_repository_engines(repo, tmp_path / "cache", fp16=True, log=lines.append) == 4
    assert all((repo / m / "1" / "model.plan").stat().st_size > 0 for m in (
        "mobilesam_image_encoder", "mobilesam_mask_decoder", "efficientvit_l0_image_encoder",
        "efficientvit_l0_mask_decoder"))
    print("\n".join(lines))
    assert build_repository_engines(repo, tmp_path / "cache", fp16=True, log=lines.append) == 0  # cached

