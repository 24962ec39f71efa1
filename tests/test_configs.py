"""Every config.pbtxt parses with Triton's own ModelConfig schema and agrees with samtriton.spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import triton_to_np_dtype

from samtriton import spec
from samtriton.build.configs import ServingOptions, WeightsInfo, model_configs, to_pbtxt
from samtriton.build.repository import MODEL_SOURCES, TEMPLATE_WEIGHTS, write_configs
from samtriton.variants import MODEL_REGISTRY, get_variant

VARIANT = get_variant("mobilesam")
NAMES = spec.model_names(VARIANT.slug)
ALL_VARIANTS = list(MODEL_REGISTRY.values())


def _parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _generated():
    return model_configs([VARIANT], {VARIANT.name: TEMPLATE_WEIGHTS}, ServingOptions())


def _zoo(default=None):
    """A repository holding every variant of the zoo."""
    weights = {v.name: WeightsInfo(f"weights of {v.name}", random=False) for v in ALL_VARIANTS}
    return model_configs(ALL_VARIANTS, weights, ServingOptions(), default=default)


MODEL_NAMES = sorted(_generated())
ZOO_ENSEMBLES = sorted(name for name, cfg in _zoo().items() if cfg.platform == "ensemble")


def test_committed_configs_are_what_the_generator_writes():
    for name, cfg in _generated().items():
        path = MODEL_SOURCES / name / "config.pbtxt"
        assert path.exists(), f"{path} missing: run `python -m samtriton.build.configs` "
        assert _parse(path) == cfg, f"{path} drifted from samtriton.spec; regenerate it"


def test_every_config_in_the_source_tree_parses():
    paths = sorted(MODEL_SOURCES.glob("*/config.pbtxt"))
    assert {p.parent.name for p in paths} == set(MODEL_NAMES)
    for path in paths:
        cfg = _parse(path)
        assert cfg.name == path.parent.name
        assert (path.parent / "1").is_dir()
        if cfg.platform == "ensemble":  # Triton convention: an empty version folder
            assert [p.name for p in (path.parent / "1").iterdir()] == [".gitkeep"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_config_tensors_match_spec(name):
    cfg = _generated()[name]
    io = spec.model_io(VARIANT.encoder_size, ServingOptions().embedding_handoff)[spec.role_of(name)]
    got_in = [(t.name, mc.DataType.Name(t.data_type), tuple(t.dims), t.optional, t.allow_ragged_batch)
              for t in cfg.input]
    got_out = [(t.name, mc.DataType.Name(t.data_type), tuple(t.dims)) for t in cfg.output]
    assert got_in == [(t.name, t.data_type, t.dims, t.optional, t.allow_ragged_batch) for t in io.inputs]
    assert got_out == [(t.name, t.data_type, t.dims) for t in io.outputs]


def test_triton_conventions():
    cfgs = _generated()
    ens = cfgs[spec.ENSEMBLE]
    assert ens.platform == "ensemble" and ens.max_batch_size == 0
    inputs = {t.name: (mc.DataType.Name(t.data_type), list(t.dims), t.optional) for t in ens.input}
    assert inputs == {
        "image": ("TYPE_STRING", [1], False),
        "boxes": ("TYPE_FP32", [-1, 4], True),
        "points": ("TYPE_FP32", [-1, -1, 2], True),
        "point_labels": ("TYPE_INT32", [-1, -1], True),
        "mask_inputs": ("TYPE_FP32", [-1, 256, 256], True),
    }
    assert [t.name for t in ens.output] == ["scores", "masks_rle", "masks", "masks_packed", "image_size",
                                               "low_res_logits"]
    assert cfgs[spec.ENCODE_ENSEMBLE].platform == "ensemble"
    for name in (NAMES.preprocess, NAMES.postprocess, NAMES.image_encoder, NAMES.mask_decoder):
        assert cfgs[name].backend == "python"
        assert cfgs[name].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    enc = cfgs[NAMES.image_encoder]
    assert enc.max_batch_size > 1 and enc.HasField("dynamic_batching")


@pytest.mark.parametrize("ensemble", ZOO_ENSEMBLES)
def test_ensemble_wiring_is_closed(ensemble):
    """Each step's mapped inputs exist (ensemble input or an earlier step's output)
    with the same full shape, unmapped inputs are optional, an optional ensemble
    input only feeds optional step inputs (Triton passes it on absent), and
    every ensemble output is produced; for every variant's ensembles and the
    aliases."""
    cfgs = _zoo()
    ens = cfgs[ensemble]

    def full_dims(cfg, tensor):
        dims = tuple(tensor.dims)
        return (1, *dims) if cfg.max_batch_size > 0 else dims

    def compatible(a, b):
        return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))

    available = {t.name: tuple(t.dims) for t in ens.input}
    optional = {t.name for t in ens.input if t.optional}
    for step in ens.ensemble_scheduling.step:
        model = cfgs[step.model_name]
        model_inputs = {t.name: t for t in model.input}
        assert set(step.input_map) <= set(model_inputs), step.model_name
        for name, tensor in model_inputs.items():
            assert name in step.input_map or tensor.optional, f"{step.model_name}.{name} is never fed"
        for model_input, ens_tensor in step.input_map.items():
            assert ens_tensor in available, f"{step.model_name} reads {ens_tensor} before it exists"
            assert ens_tensor not in optional or model_inputs[model_input].optional, (step.model_name, model_input)
            want = full_dims(model, model_inputs[model_input])
            assert compatible(want, available[ens_tensor]), (step.model_name, model_input, want)
        model_outputs = {t.name: t for t in model.output}
        assert set(step.output_map) <= set(model_outputs)
        for model_output, ens_tensor in step.output_map.items():
            available[ens_tensor] = full_dims(model, model_outputs[model_output])
    for out in ens.output:
        assert out.name in available and compatible(tuple(out.dims), available[out.name]), out.name


@pytest.mark.parametrize("ensemble", ZOO_ENSEMBLES)
def test_ensemble_steps_run_one_after_another(ensemble):
    """Each step after the first reads an output of the step before it, so that no
    two steps of a request are ever in flight together.  Triton 2.51's ensemble
    scheduler loses a request one of whose steps fails while another is still in
    flight: it ignores the other's completion and never finishes the request
    (seen here with the preprocess and `image_embedding` side by side: clients
    left waiting, and requests counted in flight at shutdown; fixed in Triton
    core only in 2026, #466 and #483)."""
    steps = _zoo()[ensemble].ensemble_scheduling.step
    for before, step in zip(steps, steps[1:]):
        assert set(step.input_map.values()) & set(before.output_map.values()), (
            f"{step.model_name} does not wait for {before.model_name}")


def test_batching_and_cache_settings():
    cfgs = _generated()
    dec = cfgs[NAMES.mask_decoder]
    assert dec.max_batch_size > 1 and dec.HasField("dynamic_batching")
    ragged = {t.name: t.allow_ragged_batch for t in dec.input}
    assert ragged == {"image_embeddings": False, "embedding_handle": False, "prompt_coords": True,
                      "prompt_labels": True, "model_mask_inputs": True, "has_mask_input": True}
    # The embedding cache is image_embedding's: one instance (one cache), its size and
    # the encoder it calls on a miss; Triton's response cache on the encoder is off.
    emb = cfgs[NAMES.image_embedding]
    emb_params = {k: v.string_value for k, v in emb.parameters.items()}
    assert [g.count for g in emb.instance_group] == [1] and emb.max_batch_size == 0
    assert (emb_params["embedding_cache_mb"], emb_params["image_encoder"]) == ("256", NAMES.image_encoder)
    assert not cfgs[NAMES.image_encoder].response_cache.enable
    sized = model_configs([VARIANT], {VARIANT.name: TEMPLATE_WEIGHTS},
                          ServingOptions(embedding_cache_mb=0, encoder_response_cache=True))
    assert sized[NAMES.image_embedding].parameters["embedding_cache_mb"].string_value == "0"
    assert sized[NAMES.image_encoder].response_cache.enable
    optional = {t.name: t.optional for t in cfgs[NAMES.preprocess].input}
    assert optional == {"image": False, "boxes": True, "points": True, "point_labels": True, "mask_inputs": True}
    # The CPU preprocess pads prompts per request; the limits reach it.
    params = {k: v.string_value for k, v in cfgs[NAMES.preprocess].parameters.items()}
    assert (params["pad_prompt_tokens"], params["max_points"], params["max_boxes"]) == ("0", "32", "256")


def test_build_parameters_are_stated(tmp_path):
    weights = WeightsInfo("RANDOM WEIGHTS (seed 3); masks are meaningless", random=True)
    write_configs(tmp_path, model_configs([VARIANT], {VARIANT.name: weights},
                                          ServingOptions(encoder_max_batch_size=8)))
    for name in MODEL_NAMES:
        cfg = _parse(tmp_path / name / "config.pbtxt")
        if name == spec.POSTPROCESS:  # shared, weightless: names the variants it serves
            assert cfg.parameters["samtriton_models"].string_value == "mobilesam"
            continue
        assert cfg.parameters["random_weights"].string_value == "true"
        assert "RANDOM WEIGHTS" in cfg.parameters["weights"].string_value
        assert cfg.parameters["samtriton_model"].string_value == "mobilesam"
    assert _parse(tmp_path / NAMES.image_encoder / "config.pbtxt").max_batch_size == 8
    assert to_pbtxt(_parse(tmp_path / spec.ENSEMBLE / "config.pbtxt")).startswith('name: "sam"')


def test_zoo_repository_names_and_frames():
    """Every variant side by side: its own steps, the encoder input of its size,
    one shared postprocess, and `sam` / `sam_encode` over the default's steps."""
    cfgs = _zoo(default="efficientvit-sam-l0")
    for v in ALL_VARIANTS:
        names = spec.model_names(v.slug)
        assert names.ensemble == v.ensemble and names.encode_ensemble == v.encode_ensemble
        enc = cfgs[names.image_encoder]
        assert list(enc.input[0].dims) == [3, v.encoder_size, v.encoder_size]
        pre = cfgs[names.preprocess].parameters
        assert pre["encoder_size"].string_value == str(v.encoder_size)
        assert pre["prompt_size"].string_value == str(spec.PROMPT_SIZE)
        steps = [s.model_name for s in cfgs[v.ensemble].ensemble_scheduling.step]
        assert steps == [names.preprocess, names.image_embedding, names.mask_decoder, spec.POSTPROCESS]
        assert cfgs[names.image_embedding].parameters["image_encoder"].string_value == names.image_encoder
        for name in (v.ensemble, names.preprocess, names.image_embedding, names.image_encoder, names.mask_decoder):
            assert cfgs[name].parameters["weights"].string_value == f"weights of {v.name}"
    sizes = {v.name: v.encoder_size for v in ALL_VARIANTS}
    assert sizes["efficientvit-sam-l0"] == sizes["efficientvit-sam-l2"] == 512
    assert sizes["efficientvit-sam-xl1"] == sizes["sam-vit-b"] == sizes["mobilesam"] == 1024
    alias = [s.model_name for s in cfgs[spec.ENSEMBLE].ensemble_scheduling.step]
    assert alias == [s.model_name for s in cfgs["sam_efficientvit_l0"].ensemble_scheduling.step]
    assert cfgs[spec.ENSEMBLE].parameters["samtriton_model"].string_value == "efficientvit-sam-l0"
    assert [n for n in cfgs if spec.role_of(n) == spec.POSTPROCESS] == [spec.POSTPROCESS]
    # Parsed back with Triton's schema, every config is what was generated.
    for cfg in cfgs.values():
        assert text_format.Parse(to_pbtxt(cfg), mc.ModelConfig()) == cfg


def test_default_must_be_built_and_variants_unique():
    with pytest.raises(KeyError):
        model_configs([VARIANT], {VARIANT.name: TEMPLATE_WEIGHTS}, ServingOptions(), default="sam-vit-b")
    with pytest.raises(ValueError, match="twice"):
        model_configs([VARIANT, VARIANT], {VARIANT.name: TEMPLATE_WEIGHTS}, ServingOptions())


def test_backpressure_settings_reach_the_batched_models():
    cfgs = model_configs([VARIANT], {VARIANT.name: TEMPLATE_WEIGHTS},
                         ServingOptions(encoder_max_queue_size=5, decoder_max_queue_size=7, queue_timeout_s=2.5))
    enc = cfgs[NAMES.image_encoder].dynamic_batching.default_queue_policy
    dec = cfgs[NAMES.mask_decoder].dynamic_batching.default_queue_policy
    assert (enc.max_queue_size, dec.max_queue_size) == (5, 7)
    for policy in (enc, dec):
        assert policy.timeout_action == mc.ModelQueuePolicy.REJECT
        assert policy.default_timeout_microseconds == 2_500_000 and policy.allow_timeout_override
    # The misses the cache step lets through never exceed what the encoder's queue holds.
    assert cfgs[NAMES.image_embedding].parameters["max_misses_in_flight"].string_value == "5"


@pytest.mark.parametrize("target, misses", [("cpu", "32"), ("gpu", "128")])
def test_default_backpressure_leaves_triton_batchers_prefetching(target, misses):
    """By default new images are bounded at the cache step and the batched models carry no
    queue policy: any policy stops Triton's dynamic batcher from prefetching the next batch."""
    cfgs = model_configs([VARIANT], {VARIANT.name: TEMPLATE_WEIGHTS}, ServingOptions.for_target(target))
    for name in (NAMES.image_encoder, NAMES.mask_decoder):
        assert cfgs[name].HasField("dynamic_batching")
        assert not cfgs[name].dynamic_batching.HasField("default_queue_policy"), name
    assert cfgs[NAMES.image_embedding].parameters["max_misses_in_flight"].string_value == misses
    unbounded = model_configs([VARIANT], {VARIANT.name: TEMPLATE_WEIGHTS}, ServingOptions(encoder_max_misses=0))
    assert unbounded[NAMES.image_embedding].parameters["max_misses_in_flight"].string_value == "0"


def test_everything_models_drive_their_own_variant():
    """`sam_everything_<slug>` per variant and `sam_everything` for the default: python models on
    the CPU that name the encoder and decoder they call and carry the variant's preprocessing."""
    cfgs = _zoo(default="efficientvit-sam-l0")
    for v in ALL_VARIANTS:
        names = spec.model_names(v.slug)
        cfg = cfgs[names.everything]
        assert spec.role_of(cfg.name) == spec.EVERYTHING
        assert cfg.backend == "python" and cfg.max_batch_size == 0
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        params = {k: p.string_value for k, p in cfg.parameters.items()}
        assert (params["image_encoder"], params["mask_decoder"]) == (names.image_encoder, names.mask_decoder)
        assert params["encoder_size"] == str(v.encoder_size) and params["samtriton_model"] == v.name
        assert [t.name for t in cfg.output] == [t.name for t in spec.EVERYTHING_OUTPUTS]
    alias = {k: p.string_value for k, p in cfgs[spec.EVERYTHING].parameters.items()}
    assert alias["image_encoder"] == spec.model_names("efficientvit_l0").image_encoder
    gpu = model_configs([VARIANT], {VARIANT.name: TEMPLATE_WEIGHTS}, ServingOptions.for_target("gpu"))
    params = gpu[spec.EVERYTHING].parameters
    # The GPU decoder engine takes one token count: the everything model pads its prompts to it.
    assert params["pad_prompt_tokens"].string_value == str(spec.gpu_prompt_tokens(32))


def test_everything_refuses_requests_beyond_its_queue_bound():
    """sam_everything carries a Triton queue policy bounding its waiting requests (4 on the
    CPU, 16 on the GPU, settable), one request a batch; 0 leaves it unbounded, without a batcher."""
    def everything(**options):
        return model_configs([VARIANT], {VARIANT.name: TEMPLATE_WEIGHTS},
                             ServingOptions.for_target(options.pop("target", "cpu"), **options))[spec.EVERYTHING]

    for cfg, bound in ((everything(), 4), (everything(target="gpu"), 16), (everything(everything_max_queue_size=1), 1)):
        assert cfg.max_batch_size == 0 and cfg.HasField("dynamic_batching")
        policy = cfg.dynamic_batching.default_queue_policy
        assert policy.max_queue_size == bound
        # Refused, not delayed: no timeout that would drop a request already waiting.
        assert policy.default_timeout_microseconds == 0
    assert not everything(everything_max_queue_size=0).HasField("dynamic_batching")


def test_cpu_steps_warm_up_at_load_with_requests_they_accept():
    """The CPU encoder and decoder each carry one zero-filled batch-1 warm-up request (Triton
    runs it before the model is ready), with every input of the model at a fixed shape the
    model's own checks accept; the GPU target and `cpu_warmup=False` carry none."""
    from samtriton.serving.decoder_batch import DecoderRequest

    for v in ALL_VARIANTS:
        names = spec.model_names(v.slug)
        cfgs = model_configs([v], {v.name: TEMPLATE_WEIGHTS}, ServingOptions())
        arrays = {}
        for name in (names.image_encoder, names.mask_decoder):
            cfg = cfgs[name]
            [warmup] = cfg.model_warmup
            assert (warmup.batch_size, warmup.count) == (1, 1)
            # The decoder warms up on the embedding as a tensor: no arena slot holds zeros.
            assert set(warmup.inputs) == {t.name for t in cfg.input} - {spec.EMBEDDING_HANDLE.name}
            for t in cfg.input:
                if t.name not in warmup.inputs:
                    continue
                w = warmup.inputs[t.name]
                assert w.zero_data and w.data_type == t.data_type and min(w.dims) > 0
                assert len(w.dims) == len(t.dims) and all(d in (-1, f) for d, f in zip(t.dims, w.dims)), t.name
                dtype = triton_to_np_dtype(mc.DataType.Name(t.data_type).removeprefix("TYPE_"))
                arrays[t.name] = np.zeros((warmup.batch_size, *w.dims), dtype)
        assert arrays[spec.PIXEL_VALUES_NAME].shape == (1, 3, v.encoder_size, v.encoder_size)
        DecoderRequest(*(arrays[n] for n in (spec.IMAGE_EMBEDDINGS_NAME, spec.PROMPT_COORDS_NAME,
                                              spec.PROMPT_LABELS_NAME, spec.MODEL_MASK_INPUTS_NAME,
                                              spec.HAS_MASK_INPUT_NAME))).check(max_prompts=1)
    for options in (ServingOptions.for_target("gpu"), ServingOptions(cpu_warmup=False)):
        cfgs = model_configs([VARIANT], {VARIANT.name: TEMPLATE_WEIGHTS}, options)
        assert not any(cfg.model_warmup for cfg in cfgs.values())
