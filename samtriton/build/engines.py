"""TensorRT engines for the GPU target: profiles, precision rules, the build, the accuracy gate.

`samtriton build-engines --model-repository DIR` turns every `tensorrt_plan`
model's `1/model.onnx` (written by `samtriton build --target gpu`) into
`1/model.plan` on the GPU that will serve it.  The profiles come from the
model's own config.pbtxt, so the engine accepts exactly what Triton may send
it.  fp16 keeps in fp32 the layers known to overflow or lose masks in fp16:
normalisations (LayerNorm, SAM's LayerNorm2d pieces), the softmax of the
two-way transformer, and EfficientViT's attention blocks.  Before a plan is
written, its masks are compared with the fp32 ONNX model's on a fixed set
(`samtriton.build.accuracy_gate`, the CPU target's too); an engine that
fails is not written.

Only the pure parts (profiles, precision rules, cache keys) run without a
GPU; the rest needs `tensorrt` and a CUDA device and is skipped in CI.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samtriton import spec
from samtriton.build import accuracy_gate as gate
from samtriton.variants import get_variant

# --- optimisation profiles ----------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """min / opt / max shape of every engine input."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def encoder_profile(encoder_size: int, max_batch_size: int) -> Profile:
    chw = (3, encoder_size, encoder_size)
    opt = max(1, max_batch_size // 2)
    return Profile({spec.PIXEL_VALUES_NAME: ((1, *chw), (opt, *chw), (max_batch_size, *chw))})


def decoder_profile(max_batch_size: int, max_prompts: int, opt_prompts: int, tokens: int) -> Profile:
    """Images per call 1..max_batch_size (one per request); prompts per call
    1..max_batch_size * max_prompts, as flat ragged elements: `tokens` labels
    and 2 * `tokens` coordinates per prompt, and 256 x 256 per mask input (at
    least one per request, the placeholder; at most one per prompt)."""
    max_total = max_batch_size * max_prompts
    opt_total = min(max(1, opt_prompts), max_total)
    opt_images = max(1, max_batch_size // 2)
    emb = spec.EMBEDDING_SHAPE
    mask = spec.LOW_RES_MASK_SIZE * spec.LOW_RES_MASK_SIZE

    def per_prompt(elements: int):
        return (elements,), (elements * opt_total,), (elements * max_total,)

    return Profile({
        spec.IMAGE_EMBEDDINGS_NAME: ((1, *emb), (opt_images, *emb), (max_batch_size, *emb)),
        spec.PROMPT_COORDS_NAME: per_prompt(2 * tokens),
        spec.PROMPT_LABELS_NAME: per_prompt(tokens),
        spec.MODEL_MASK_INPUTS_NAME: ((mask,), (mask * opt_images,), (mask * max_total,)),
        spec.HAS_MASK_INPUT_NAME: per_prompt(1),
        spec.LABELS_ACCUMULATED_NAME: ((1,), (opt_images,), (max_batch_size,)),
        spec.MASKS_ACCUMULATED_NAME: ((1,), (opt_images,), (max_batch_size,)),
    })


def profile_from_config(cfg, encoder_size: int) -> Profile:
    """The profile of a generated tensorrt_plan config (`spec.role_of` its name)."""
    role = spec.role_of(cfg.name)
    if role == spec.IMAGE_ENCODER:
        return encoder_profile(encoder_size, cfg.max_batch_size)
    if role == spec.MASK_DECODER:
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        return decoder_profile(cfg.max_batch_size, int(params["max_boxes"]), int(params["opt_boxes"]),
                               int(params["prompt_tokens"]))
    raise ValueError(f"{cfg.name} is not an encoder or decoder")


# --- precision ------------------------------------------------------------------

# Layer names come from the ONNX node names (the exporter names nodes after
# module paths, e.g. "/mask_decoder/transformer/layers.0/self_attn/Softmax").
_FP32_RULES = (
    # LayerNorm exported as one op (TinyViT, ViT-B blocks, the decoder's norms and
    # its channels-last upscaling's).
    re.compile(r"LayerNormalization"),
    # LayerNorm2d spelled out (ReduceMean, Sub, Pow, Sqrt, Div): SAM's neck and
    # mask-input downscaling, EfficientViT-SAM's final norm.
    re.compile(r"/(norm\d*|neck\.[13]|mask_downscaling\.[14])/"),
    # Attention softmaxes: the two-way transformer's (fp16 gave wrong masks,
    # TensorRT #3999) and the encoders'; cheap to keep exact.
    re.compile(r"/Softmax(_\d+)?$"),
    # EfficientViT's multi-scale linear attention (LiteMLA): the whole context
    # module, whose ReLU-kernel sums overflow in fp16 (efficientvit #113/#116).
    re.compile(r"/context_module/"),
)


def keep_fp32(layer_name: str) -> bool:
    return any(rule.search(layer_name) for rule in _FP32_RULES)


# --- the engine cache and the build -----------------------------------------------


def cache_key(gpu_name: str, tensorrt_version: str, onnx_sha256: str, profile: Profile, fp16: bool) -> str:
    """Engines are only valid for one GPU model and TensorRT version; a new ONNX,
    profile or precision also needs a new one."""
    text = repr((gpu_name, tensorrt_version, onnx_sha256, sorted(profile.shapes.items()), fp16))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class EngineBuildError(RuntimeError):
    pass


def build_engine(onnx_path: Path, profile: Profile, fp16: bool, log=print) -> bytes:
    """Parse `onnx_path` with TensorRT and build a serialized engine (needs a GPU)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes.items():
        trt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(trt_profile)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        kept = 0
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if keep_fp32(layer.name) and layer.type not in (trt.LayerType.SHAPE, trt.LayerType.CONSTANT):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    if layer.get_output(j).dtype in (trt.float32, trt.float16):
                        layer.set_output_type(j, trt.float32)
                kept += 1
        log(f"  fp16 with {kept} of {network.num_layers} layers kept in fp32")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path}")
    return bytes(serialized)


# --- a repository's engines -------------------------------------------------------


def gpu_name() -> str:
    import subprocess

    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                         capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip()


def _run_engine(plan: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(plan)) as runner:
        return {k: np.asarray(v) for k, v in runner.infer(feeds).items()}


def _onnx_runner(path: Path) -> gate.Run:
    from samtriton.serving.cpu_runtime import make_session

    return gate.session_runner(make_session(path))


def accuracy_gate(role: str, plan: bytes, onnx_path: Path, decoder_onnx: Path, pixels: np.ndarray,
                  tokens: int) -> gate.GateReport:
    """The engine against the fp32 ONNX model (`samtriton.build.accuracy_gate`);
    an encoder engine is judged through the fp32 decoder on `pixels`."""
    def engine(feeds):
        return _run_engine(plan, feeds)

    if role == spec.IMAGE_ENCODER:
        return gate.judge_encoder(engine, _onnx_runner(onnx_path), _onnx_runner(decoder_onnx), pixels, tokens)
    return gate.judge_decoder(engine, _onnx_runner(onnx_path), tokens)


def build_repository_engines(repo: Path, cache_dir: Path, fp16: bool = True, log=print) -> int:
    """Build (or take from `cache_dir`) the plan of every tensorrt_plan model in `repo`.

    Returns the number of engines built; raises EngineBuildError when one fails
    to build or fails the accuracy gate (nothing is written for it).
    """
    import shutil

    import tensorrt as trt

    from samtriton.build.configs import TENSORRT_PLAN, parse_pbtxt
    from samtriton.build.download import sha256_of

    gpu = gpu_name()
    built = 0
    configs = {p.parent.name: parse_pbtxt(p.read_text()) for p in sorted(repo.glob("*/config.pbtxt"))}
    for name, cfg in configs.items():
        if cfg.platform != "tensorrt_plan":
            continue
        version = repo / name / "1"
        onnx_path = version / "model.onnx"
        encoder_size = _encoder_size(configs, cfg)
        profile = profile_from_config(cfg, encoder_size)
        key = cache_key(gpu, trt.__version__, sha256_of(onnx_path), profile, fp16)
        cached = cache_dir / name / key / TENSORRT_PLAN
        if cached.is_file():
            log(f"{name}: engine from the cache ({gpu}, TensorRT {trt.__version__}, key {key})")
        else:
            log(f"{name}: building a {'fp16' if fp16 else 'fp32'} engine on {gpu} (TensorRT {trt.__version__})")
            plan = build_engine(onnx_path, profile, fp16, log)
            decoder_name = _sibling(name, spec.MASK_DECODER)
            tokens = int(configs[decoder_name].parameters["prompt_tokens"].string_value)
            decoder = repo / decoder_name / "1" / "model.onnx"
            variant = get_variant(cfg.parameters[spec.VARIANT_PARAMETER].string_value)
            pixels = gate.sample_pixels(encoder_size, variant.pixel_mean, variant.pixel_std)
            report = accuracy_gate(spec.role_of(name), plan, onnx_path, decoder, pixels, tokens)
            log(f"  {report.line()}")
            if not report.passed():
                raise EngineBuildError(f"{name}: the engine fails the accuracy gate ({report.line()}); "
                                       "not written. Try --fp32 for this model.")
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".part")
            tmp.write_bytes(plan)
            tmp.rename(cached)
            built += 1
        shutil.copyfile(cached, version / TENSORRT_PLAN)
    return built


def _sibling(model_name: str, role: str) -> str:
    slug = model_name.rsplit("_" + spec.role_of(model_name), 1)[0]
    return spec.model_names(slug).of(role)


def _encoder_size(configs, cfg) -> int:
    encoder = configs[_sibling(cfg.name, spec.IMAGE_ENCODER)]
    return int(list(encoder.input[0].dims)[-1])
