"""Generate every config.pbtxt from `samtriton.spec`, as Triton `ModelConfig` protobufs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from samtriton import spec
from samtriton.build.cpu_steps import DEFAULT_DECODER, DEFAULT_ENCODER, VariantSteps
from samtriton.serving.cpu_runtime import StepRuntime
from samtriton.serving.preprocessing import PreprocessSettings
from samtriton.serving.prompts import Limits
from samtriton.variants import ModelVariant


TARGETS = ("cpu", "gpu")


@dataclass(frozen=True)
class ServingOptions:
    """Knobs of the generated repository that are not fixed by the model.

    The defaults are the CPU target's.  No queue delay: on the CPU a batch
    computes no faster per item than its items one by one (the encoder and
    decoder are compute-bound), so waiting for one to fill only adds latency;
    requests that arrive while a step is busy still queue and go together.
    Batches stay small because a batch of 4 already keeps both cores busy for
    a second.  The GPU target's are in `for_target("gpu")`.
    """

    target: str = "cpu"
    encoder_max_batch_size: int = 4
    encoder_queue_delay_us: int = 0
    encoder_preferred_batch_sizes: tuple[int, ...] = ()
    # The embedding cache of `image_embedding` (the `sam` and `sam_encode`
    # ensembles): keyed by the encoded image, LRU, this many MiB per variant
    # (an embedding is 4 MiB).  0: no cache.
    embedding_cache_mb: int = 256
    # CPU target: `image_embedding` keeps its embeddings in a /dev/shm arena and
    # the `sam` ensemble hands the decoder a slot's handle instead of the 4 MiB
    # tensor (samtriton.serving.embedding_arena; a cache hit 1.27x the decoder's
    # time against 1.44x with the tensor, medians of paired runs, perf/README).
    # The arena holds the cache plus this many slots for embeddings on their way
    # to the decoder (a released slot is reused once its handles have been read).
    embedding_handoff: bool = True
    embedding_handoff_spare_slots: int = 16
    # Threads that decode, resize and normalise images on embedding-cache misses.
    embedding_decode_threads: int = 2
    # Triton's response cache on the encoder itself (keyed by the 12 MB encoder
    # input; the server's --cache-config bounds it).  Off: `image_embedding`
    # caches the embeddings; sam_everything's crops are rarely repeated.
    encoder_response_cache: bool = False
    encoder_instances: int = 1
    # Requests with different prompt counts and kinds share a decoder call (ragged batching).
    decoder_max_batch_size: int = 16
    decoder_queue_delay_us: int = 0
    decoder_instances: int = 1
    # Backpressure: new images beyond this many being embedded at once are
    # refused at once by the embedding-cache step with UNAVAILABLE ("exceeds
    # maximum queue size") instead of piling up in front of the encoder.  CPU:
    # 32 images is ~5-50 s of encoder work on 2 cores.
    encoder_max_misses: int = 32
    # Triton's own queue policy on the encoder and decoder (a queue bound and a
    # REJECT timeout that clients may shorten); 0: none, the default.  Any
    # policy turns off the dynamic batcher's prefetching (Triton core's
    # PriorityQueue), and without it a batcher that found its instance busy
    # sleeps until the next request arrives or 500 ms pass: the instance sits
    # idle with requests queued (seen in Triton's traces: 500-570 ms gaps in
    # the decoder under load).  MobileSAM, 2 cores: served / in-process
    # throughput 0.87x with both policies, 0.95x without (perf/README.md).
    encoder_max_queue_size: int = 0
    decoder_max_queue_size: int = 0
    queue_timeout_s: float = 0.0
    preprocess_instances: int = 2
    postprocess_instances: int = 2
    # sam_everything: concurrent requests per model, the prompts per decoder
    # request it sends and how many it keeps in flight.  Small decoder
    # requests, one at a time, keep other clients' requests from queueing
    # behind a long one (Triton's batcher is first-come first-served and a BLS
    # request has no priority); results do not depend on the split.
    everything_instances: int = 2
    everything_decoder_prompts: int = 8
    everything_decoder_window: int = 1
    # sam_everything requests waiting beyond the ones being served are refused
    # at once with UNAVAILABLE ("exceeds maximum queue size"; the SDK's
    # ServerBusyError) by a Triton queue policy: on the CPU one request is 1-20 s
    # of decoder work, so a deeper queue only turns overload into timeouts.  The
    # batcher's stall (above) can still delay a queued request's start, by up to
    # 0.5 s against requests that take seconds (0.7 s python requests, 4 at once:
    # 1 start of 24 waited 0.3 s with the policy, none without).  0: unbounded.
    everything_max_queue_size: int = 4
    # 0 lets ONNX Runtime / OpenVINO use every core; set it when several instances share a host.
    intra_op_threads: int = 0
    # CPU target: each step's runtime and precision (samtriton.build.cpu_steps;
    # bf16 falls back to fp32 on CPUs without it, and is gated at build time).
    encoder_runtime: StepRuntime = DEFAULT_ENCODER
    decoder_runtime: StepRuntime = DEFAULT_DECODER
    limits: Limits = field(default_factory=Limits)
    # GPU target: the decoder engine's optimisation profile is tuned for this
    # many prompts per call (its maximum is decoder_max_batch_size * max_boxes).
    decoder_opt_boxes: int = 32
    # CPU target: Triton runs one zero-filled request through the encoder and the decoder
    # (one box) at load, before they are ready, so that OpenVINO's and ONNX Runtime's first
    # call falls on it and not on the first client (OpenVINO, L0 on 2 cores: encoder 170-180 ms
    # against 68-90 ms after; decoder, one box, 37 ms against 20 ms).
    cpu_warmup: bool = True

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.embedding_handoff and self.target != "cpu":
            raise ValueError("embedding_handoff needs the CPU target's python decoder")
        if self.embedding_handoff_spare_slots < 1:
            raise ValueError(f"embedding_handoff_spare_slots must be >= 1, got {self.embedding_handoff_spare_slots}")
        if self.everything_max_queue_size < 0:
            raise ValueError(f"everything_max_queue_size must be >= 0 (0: unbounded), got {self.everything_max_queue_size}")

    @classmethod
    def for_target(cls, target: str, **overrides) -> "ServingOptions":
        """Defaults of `target`, with `overrides` (None values ignored) on top.

        GPU: an encoder call takes milliseconds, so batches fill in 1 ms and
        go up to 8 images; the decoder engine takes up to 4 requests of up to
        256 boxes (its profile maximum, 1024 boxes, bounds its memory); more
        CPU instances of the pre/postprocess keep the GPU fed.
        """
        base = {"target": target}
        if target == "gpu":
            base.update(encoder_max_batch_size=8, encoder_queue_delay_us=1000, encoder_preferred_batch_sizes=(4, 8),
                        decoder_max_batch_size=4, decoder_queue_delay_us=500, preprocess_instances=4,
                        embedding_decode_threads=4,
                        postprocess_instances=4, encoder_max_misses=128, embedding_handoff=False,
                        everything_max_queue_size=16)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


@dataclass(frozen=True)
class WeightsInfo:
    """What the engines were built from; written into every config's parameters."""

    description: str  # e.g. "checkpoint mobile_sam.pt sha256=..." or "RANDOM WEIGHTS (seed 0)"
    random: bool


# The engine file Triton's TensorRT backend loads from a GPU-target version folder;
# `samtriton build-engines` writes it beside the model.onnx it comes from.
TENSORRT_PLAN = "model.plan"


def _add_tensors(container, tensors, inputs: bool = False):
    for t in tensors:
        entry = container.add(name=t.name, data_type=getattr(mc, t.data_type), dims=list(t.dims))
        if inputs and t.optional:
            entry.optional = True
        if inputs and t.allow_ragged_batch:
            entry.allow_ragged_batch = True


def _base(name: str, variant: ModelVariant | None, weights: WeightsInfo | None) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=name)
    if variant is not None:
        cfg.parameters[spec.VARIANT_PARAMETER].string_value = variant.name
        cfg.parameters["weights"].string_value = weights.description
        cfg.parameters["random_weights"].string_value = "true" if weights.random else "false"
    return cfg


def _python_model(name, variant, weights, io: spec.ModelIO, instances: int, max_batch_size: int = 0):
    cfg = _base(name, variant, weights)
    cfg.backend = "python"
    cfg.max_batch_size = max_batch_size
    _add_tensors(cfg.input, io.inputs, inputs=True)
    _add_tensors(cfg.output, io.outputs)
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    return cfg


def _tensorrt_model(name, variant, weights, io: spec.ModelIO, instances: int, max_batch_size: int):
    cfg = _base(name, variant, weights)
    cfg.platform = "tensorrt_plan"
    cfg.default_model_filename = TENSORRT_PLAN
    cfg.max_batch_size = max_batch_size
    _add_tensors(cfg.input, io.inputs, inputs=True)
    _add_tensors(cfg.output, io.outputs)
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=instances)
    return cfg


def _tensorrt_encoder(names, variant, weights, io, options: ServingOptions) -> mc.ModelConfig:
    return _tensorrt_model(names.image_encoder, variant, weights, io[spec.IMAGE_ENCODER],
                           options.encoder_instances, options.encoder_max_batch_size)


def _tensorrt_decoder(names, variant, weights, io, options: ServingOptions) -> mc.ModelConfig:
    """The decoder engine under Triton's ragged batching.

    Requests keep their per-request prompt tensors (the ensemble's shapes);
    `reshape [-1]` makes the multi-axis ones flat so the TensorRT backend
    concatenates all requests' prompts, labels and mask inputs into 1-D
    tensors; two batch inputs give the running element counts of the labels
    and the mask inputs (RaggedPromptMaskDecoderExport turns them into each
    prompt's image and mask), and the per-prompt outputs are scattered back by
    each request's `has_mask_input` length, one element per prompt.  The
    engine decodes all four mask tokens; the postprocess picks.
    """
    dec = _tensorrt_model(names.mask_decoder, variant, weights, io[spec.MASK_DECODER],
                          options.decoder_instances, options.decoder_max_batch_size)
    for t in dec.input:
        if t.name in (spec.PROMPT_COORDS_NAME, spec.PROMPT_LABELS_NAME, spec.MODEL_MASK_INPUTS_NAME):
            t.reshape.shape.extend([-1])
    for target, source in ((spec.LABELS_ACCUMULATED_NAME, spec.PROMPT_LABELS_NAME),
                           (spec.MASKS_ACCUMULATED_NAME, spec.MODEL_MASK_INPUTS_NAME)):
        dec.batch_input.add(kind=mc.BatchInput.BATCH_ACCUMULATED_ELEMENT_COUNT, target_name=[target],
                            data_type=mc.TYPE_INT32, source_input=[source])
    dec.batch_output.add(
        target_name=[spec.LOW_RES_MASKS_NAME, spec.IOU_PREDICTIONS_NAME],
        kind=mc.BatchOutput.BATCH_SCATTER_WITH_INPUT_SHAPE, source_input=[spec.HAS_MASK_INPUT_NAME],
    )
    for t in dec.output:  # the engine's candidate axis is static: every mask token
        t.dims[1] = spec.NUM_MASK_TOKENS
    dec.parameters["max_boxes"].string_value = str(options.limits.max_boxes)
    dec.parameters["prompt_tokens"].string_value = str(spec.gpu_prompt_tokens(options.limits.max_points))
    dec.parameters["opt_boxes"].string_value = str(options.decoder_opt_boxes)
    return dec


# The decoder's warm-up request: one box (two corner tokens), no mask input.
DECODER_WARMUP_DIMS = {spec.PROMPT_COORDS_NAME: [1, 2, 2], spec.PROMPT_LABELS_NAME: [1, 2],
                       spec.MODEL_MASK_INPUTS_NAME: [1, spec.LOW_RES_MASK_SIZE, spec.LOW_RES_MASK_SIZE],
                       spec.HAS_MASK_INPUT_NAME: [1]}


def _add_warmup(cfg: mc.ModelConfig, dims: Mapping[str, list[int]] | None = None) -> None:
    """One batch-1 warm-up request of zeros (`dims` for the inputs whose own dims are variable);
    the decoder's takes its embedding as a tensor (no arena slot holds zeros)."""
    warmup = cfg.model_warmup.add(name="first_call", batch_size=1, count=1)
    for t in cfg.input:
        if t.name == spec.EMBEDDING_HANDLE.name:
            continue
        shape = list((dims or {}).get(t.name, t.dims))
        if any(d < 0 for d in shape):
            raise ValueError(f"{cfg.name}: warm-up input {t.name} needs fixed dims, has {shape}")
        warmup.inputs[t.name].CopyFrom(mc.ModelWarmup.Input(data_type=t.data_type, dims=shape, zero_data=True))


def _queue_policy(cfg: mc.ModelConfig, max_queue_size: int, timeout_s: float = 0.0) -> None:
    """Triton's default queue policy on `cfg`: requests waiting beyond `max_queue_size` are refused
    at once, and with `timeout_s` those queued longer (REJECT; a client may ask for less).  With
    neither the config is left as it was (no policy, and no `dynamic_batching` added)."""
    if max_queue_size > 0:
        cfg.dynamic_batching.default_queue_policy.max_queue_size = max_queue_size
    if timeout_s > 0:
        policy = cfg.dynamic_batching.default_queue_policy
        policy.timeout_action = mc.ModelQueuePolicy.REJECT
        policy.default_timeout_microseconds = int(timeout_s * 1e6)
        policy.allow_timeout_override = True


def _everything(name: str, names: spec.ModelNames, variant: ModelVariant, weights: WeightsInfo,
                options: ServingOptions) -> mc.ModelConfig:
    """The BLS model behind segment-everything: it calls this variant's encoder and decoder itself."""
    io = spec.model_io(variant.encoder_size)
    cfg = _python_model(name, variant, weights, io[spec.EVERYTHING], options.everything_instances)
    pad_tokens = spec.gpu_prompt_tokens(options.limits.max_points) if options.target == "gpu" else 0
    settings = PreprocessSettings.for_variant(variant, options.limits, pad_tokens).to_parameters()
    settings.update(image_encoder=names.image_encoder, image_embedding=names.image_embedding,
                    mask_decoder=names.mask_decoder,
                    decoder_request_prompts=str(options.everything_decoder_prompts),
                    decoder_window=str(options.everything_decoder_window))
    for key, value in settings.items():
        cfg.parameters[key].string_value = value
    # With max_batch_size 0 the batcher still schedules one request at a time; it is here
    # for its queue policy (Triton refuses the request beyond the bound before execute()).
    _queue_policy(cfg, options.everything_max_queue_size)
    return cfg


def _ensemble(name: str, role: str, names: spec.ModelNames, variant: ModelVariant, weights: WeightsInfo,
              embedding_handoff: bool):
    io = spec.model_io(variant.encoder_size)
    ens = _base(name, variant, weights)
    ens.platform = "ensemble"
    ens.max_batch_size = 0
    _add_tensors(ens.input, io[role].inputs, inputs=True)
    _add_tensors(ens.output, io[role].outputs)
    for model, inputs, outputs in spec.ensemble_steps(role, names, variant.encoder_size, embedding_handoff):
        step = ens.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        step.input_map.update(inputs)
        step.output_map.update(outputs)
    return ens


def variant_configs(variant: ModelVariant, weights: WeightsInfo, options: ServingOptions,
                    steps: VariantSteps | None = None) -> list[mc.ModelConfig]:
    """One variant's preprocess, image embedding, encoder, decoder, its two
    ensembles and sam_everything; `steps`:
    the CPU runtimes a build chose and gated (None: the options', unchecked)."""
    io = spec.model_io(variant.encoder_size, options.embedding_handoff)
    names = spec.model_names(variant.slug)

    pre = _python_model(names.preprocess, variant, weights, io[spec.PREPROCESS], options.preprocess_instances)
    # TensorRT's flat ragged prompts need one token count for every prompt.
    pad_tokens = spec.gpu_prompt_tokens(options.limits.max_points) if options.target == "gpu" else 0
    settings = PreprocessSettings.for_variant(variant, options.limits, pad_tokens).to_parameters()
    for key, value in settings.items():
        pre.parameters[key].string_value = value
    # One instance: one cache for every request (it answers them concurrently).
    emb = _python_model(names.image_embedding, variant, weights, io[spec.IMAGE_EMBEDDING], instances=1)
    # Misses in flight (0: unbounded), never more than a Triton queue bound on the encoder
    # holds: a BLS request the encoder refuses keeps its 12 MB input in Triton 2.51's python
    # backend (measured: +25 MB resident per refusal, never given back).
    bounds = [n for n in (options.encoder_max_misses, options.encoder_max_queue_size) if n > 0]
    max_misses = min(bounds, default=0)
    settings.update(image_encoder=names.image_encoder, embedding_cache_mb=str(options.embedding_cache_mb),
                    decode_threads=str(options.embedding_decode_threads), max_misses_in_flight=str(max_misses),
                    embedding_handoff_spare_slots=str(options.embedding_handoff_spare_slots
                                                      if options.embedding_handoff else 0))
    for key, value in settings.items():
        emb.parameters[key].string_value = value

    if options.target == "gpu":
        enc, dec = _tensorrt_encoder(names, variant, weights, io, options), _tensorrt_decoder(
            names, variant, weights, io, options)
    else:
        enc = _python_model(
            names.image_encoder, variant, weights, io[spec.IMAGE_ENCODER], options.encoder_instances,
            max_batch_size=options.encoder_max_batch_size,
        )
        enc.parameters["intra_op_threads"].string_value = str(options.intra_op_threads)
        dec = _python_model(
            names.mask_decoder, variant, weights, io[spec.MASK_DECODER], options.decoder_instances,
            max_batch_size=options.decoder_max_batch_size,
        )
        dec.parameters["intra_op_threads"].string_value = str(options.intra_op_threads)
        dec.parameters["max_boxes"].string_value = str(options.limits.max_boxes)
        steps = steps or VariantSteps.unchecked(options.encoder_runtime, options.decoder_runtime)
        for cfg, choice in ((enc, steps.encoder), (dec, steps.decoder)):
            for key, value in choice.to_parameters().items():
                cfg.parameters[key].string_value = value
        if options.cpu_warmup:
            _add_warmup(enc)
            _add_warmup(dec, DECODER_WARMUP_DIMS)
    enc.dynamic_batching.max_queue_delay_microseconds = options.encoder_queue_delay_us
    enc.dynamic_batching.preferred_batch_size.extend(options.encoder_preferred_batch_sizes)
    enc.response_cache.enable = options.encoder_response_cache
    dec.dynamic_batching.max_queue_delay_microseconds = options.decoder_queue_delay_us
    for cfg, size in ((enc, options.encoder_max_queue_size), (dec, options.decoder_max_queue_size)):
        _queue_policy(cfg, size, options.queue_timeout_s)

    ensembles = [_ensemble(names.of(role), role, names, variant, weights, options.embedding_handoff)
                 for role in (spec.ENSEMBLE, spec.ENCODE_ENSEMBLE)]
    return [*ensembles, pre, emb, enc, dec, _everything(names.everything, names, variant, weights, options)]


def model_configs(
    variants: Sequence[ModelVariant],
    weights: Mapping[str, WeightsInfo],
    options: ServingOptions,
    default: str | None = None,
    steps: Mapping[str, VariantSteps] | None = None,
) -> dict[str, mc.ModelConfig]:
    """Every config of a repository holding `variants` (weights keyed by variant name).

    `default` (the first variant if None) also answers as `sam` / `sam_encode`:
    two more ensembles over the same step models, so the alias costs no memory;
    and as `sam_everything`, a python model of its own (Triton does not pass a
    client's cancellation into a running ensemble step).
    """
    if not variants:
        raise ValueError("at least one model variant is required")
    if len({v.name for v in variants}) != len(variants):
        raise ValueError("a model variant is listed twice")
    by_name = {v.name: v for v in variants}
    default_variant = by_name[default] if default is not None else variants[0]

    configs = []
    for variant in variants:
        configs.extend(variant_configs(variant, weights[variant.name], options,
                                       None if steps is None else steps[variant.name]))
    aliases = spec.default_names(default_variant.slug)
    for role in (spec.ENSEMBLE, spec.ENCODE_ENSEMBLE):
        configs.append(_ensemble(aliases.of(role), role, aliases, default_variant, weights[default_variant.name],
                                 options.embedding_handoff))
    configs.append(_everything(aliases.everything, aliases, default_variant, weights[default_variant.name], options))

    io = spec.model_io(default_variant.encoder_size)
    post = _python_model(spec.POSTPROCESS, None, None, io[spec.POSTPROCESS], options.postprocess_instances)
    post.parameters["samtriton_models"].string_value = ",".join(v.name for v in variants)
    configs.append(post)
    return {c.name: c for c in configs}


def to_pbtxt(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def parse_pbtxt(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


if __name__ == "__main__":
    # Regenerate the configs committed under model_repository/ (the defaults
    # of the CPU target, with a placeholder for the weights).
    from samtriton.build.repository import MODEL_SOURCES, TEMPLATE_WEIGHTS, write_configs
    from samtriton.variants import DEFAULT_MODEL, get_variant

    write_configs(MODEL_SOURCES, model_configs([get_variant(DEFAULT_MODEL)], {DEFAULT_MODEL: TEMPLATE_WEIGHTS},
                                               ServingOptions()))
    print(f"wrote configs under {MODEL_SOURCES}")
