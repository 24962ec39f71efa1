"""Write a complete Triton model repository for one or more model variants (CPU target)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from samtriton import spec
from samtriton.build import checkpoint as ckpt
from samtriton.build.configs import ServingOptions, WeightsInfo, model_configs, to_pbtxt
from samtriton.build.download import sha256_of
from samtriton.build import trt_compat
from samtriton.build.cpu_steps import VariantSteps, choose_steps
from samtriton.build.memory import release_memory
from samtriton.build.onnx_export import (
    ParityReport,
    check_parity,
    export_decoder,
    export_encoder,
    export_ragged_decoder,
)
from samtriton.variants import DEFAULT_MODEL, ModelVariant, get_variant

# The python models' sources: the committed model_repository/ is what
# `samtriton build --model mobilesam` writes, less the ONNX files; the other
# variants' step models get copies of the same model.py files.
MODEL_SOURCES = Path(__file__).resolve().parents[2] / "model_repository"
SOURCE_NAMES = spec.default_names(get_variant(DEFAULT_MODEL).slug)
# Placeholder written into the configs committed under model_repository/.
TEMPLATE_WEIGHTS = WeightsInfo(description="set by `samtriton build`", random=False)

class ParityError(RuntimeError):
    pass


RANDOM_BANNER = """\
************************************************************************
*  RANDOM WEIGHTS: this repository was built from a randomly initialised *
*  model. Its masks are meaningless; use it for tests only.              *
*  For real masks: samtriton build --model NAME (downloads the official  *
*  checkpoint) or --checkpoint PATH|URL.                                 *
************************************************************************"""


@dataclass(frozen=True)
class ModelSource:
    """One variant to build, from a checkpoint file or from random weights."""

    variant: ModelVariant
    checkpoint: Path | None = None
    random_seed: int | None = None

    def __post_init__(self):
        if (self.checkpoint is None) == (self.random_seed is None):
            raise ValueError(f"{self.variant.name}: pass exactly one of checkpoint and random_seed")


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    weights: dict[str, WeightsInfo]
    parity: dict[str, ParityReport]
    seconds: float
    default: str = field(default="")
    # CPU target: each variant's step runtimes and their gate figures.
    steps: dict[str, VariantSteps] = field(default_factory=dict)


def write_configs(out_dir: Path, configs) -> None:
    for name, cfg in configs.items():
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        (out_dir / name / "config.pbtxt").write_text(to_pbtxt(cfg))


def _copy_python_models(out_dir: Path, configs) -> None:
    if not MODEL_SOURCES.is_dir():
        raise FileNotFoundError(f"python model sources not found at {MODEL_SOURCES}")
    for name, cfg in configs.items():
        version = out_dir / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        if cfg.platform == "ensemble":
            (version / ".gitkeep").touch()
            continue
        if cfg.platform == "tensorrt_plan":  # model.onnx now, model.plan from build-engines
            continue
        src = MODEL_SOURCES / SOURCE_NAMES.of(spec.role_of(name)) / "1" / "model.py"
        shutil.copy2(src, version / "model.py")


def _check_tensorrt_graphs(variant: ModelVariant, encoder_onnx: Path, decoder_onnx: Path, log) -> None:
    import onnx

    found = trt_compat.problems(onnx.load(str(encoder_onnx), load_external_data=False), ())
    found += trt_compat.problems(onnx.load(str(decoder_onnx)), trt_compat.DECODER_VALUE_INPUTS)
    if found:
        raise ParityError(f"{variant.name}: the ONNX graphs are not TensorRT-ready: " + "; ".join(found[:5]))
    log(f"[{variant.name}] graphs checked for TensorRT (operators, no shape computed from prompt values)")


def _export_variant(source: ModelSource, out_dir: Path, tmp: Path, log,
                    options: ServingOptions) -> tuple[WeightsInfo, ParityReport, VariantSteps | None]:
    variant = source.variant
    if source.checkpoint is None:
        checkpoint = ckpt.write_random_checkpoint(variant, tmp / variant.checkpoint_file, source.random_seed)
        weights = WeightsInfo(f"RANDOM WEIGHTS (seed {source.random_seed}); masks are meaningless", random=True)
    else:
        checkpoint = source.checkpoint
        weights = WeightsInfo(f"checkpoint {Path(checkpoint).name} sha256={sha256_of(checkpoint)}", random=False)
    log(f"[{variant.name}] loading {checkpoint}")
    sam = ckpt.load_model(variant, checkpoint)
    names = spec.model_names(variant.slug)
    encoder_onnx = out_dir / names.image_encoder / "1" / "model.onnx"
    decoder_onnx = out_dir / names.mask_decoder / "1" / "model.onnx"
    encoder_onnx.parent.mkdir(parents=True, exist_ok=True)
    decoder_onnx.parent.mkdir(parents=True, exist_ok=True)
    log(f"[{variant.name}] exporting the image encoder ({variant.encoder_size}x{variant.encoder_size}) to ONNX")
    export_encoder(sam, variant.encoder_size, encoder_onnx)
    release_memory()
    ragged_tokens = None
    if options.target == "gpu":
        ragged_tokens = spec.gpu_prompt_tokens(options.limits.max_points)
        log(f"[{variant.name}] exporting the mask decoder to ONNX (ragged prompts of {ragged_tokens} tokens, "
            "for TensorRT)")
        export_ragged_decoder(sam, decoder_onnx, ragged_tokens)
        _check_tensorrt_graphs(variant, encoder_onnx, decoder_onnx, log)
    else:
        log(f"[{variant.name}] exporting the mask decoder to ONNX")
        export_decoder(sam, decoder_onnx)
    log(f"[{variant.name}] checking ONNX Runtime against PyTorch (boxes, points, box + points, mask inputs; "
        "all mask tokens)")
    release_memory()
    # The PyTorch model goes after the check (`del sam` below): its encoder already inside it.
    parity = check_parity(sam, variant.encoder_size, encoder_onnx, decoder_onnx, ragged_tokens=ragged_tokens,
                          keep_torch_encoder=False)
    for line in parity.lines():
        log("  " + line)
    if parity.problems():
        raise ParityError(f"{variant.name}: the exported ONNX does not reproduce PyTorch: "
                          + "; ".join(parity.problems()) + ". Nothing was written.")
    del sam  # PyTorch's copy of the weights is not needed for the gate
    release_memory()
    steps = None
    if options.target == "cpu":
        steps = choose_steps(variant, encoder_onnx, decoder_onnx, options.encoder_runtime, options.decoder_runtime,
                             log)
    return weights, parity, steps


def build_repository(
    sources: Sequence[ModelSource],
    out_dir: str | Path,
    options: ServingOptions = ServingOptions(),
    default: str | None = None,
    log=print,
) -> BuildResult:
    """Export every variant's ONNX, check parity, and write the repository.

    The repository is assembled next to `out_dir` and swapped in at the end,
    so a failed build leaves the previous one as it was.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    variants = [s.variant for s in sources]
    default = default or variants[0].name
    if default not in {v.name for v in variants}:
        raise ValueError(f"default model {default!r} is not among the models built: "
                         + ", ".join(v.name for v in variants))
    any_random = any(s.checkpoint is None for s in sources)
    if any_random:
        log(RANDOM_BANNER)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        weights, parity, steps = {}, {}, {}
        with tempfile.TemporaryDirectory(prefix="samtriton-build-") as tmp:
            for source in sources:
                name = source.variant.name
                weights[name], parity[name], steps[name] = _export_variant(source, staging, Path(tmp), log, options)
        configs = model_configs(variants, weights, options, default,
                                steps=steps if options.target == "cpu" else None)
        _copy_python_models(staging, configs)
        write_configs(staging, configs)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    if any_random:
        log(RANDOM_BANNER)
    for v in variants:
        log(f"{v.name}: ensemble {v.ensemble}" + (" (also `sam`, the default)" if v.name == default else "")
            + f"; {weights[v.name].description}")
        if steps.get(v.name) is not None:
            log(f"  image encoder: {steps[v.name].encoder.summary()}")
            log(f"  mask decoder:  {steps[v.name].decoder.summary()}")
    log(f"wrote {out_dir}")
    if options.target == "gpu":
        log("GPU target: build the TensorRT engines on the serving GPU with "
            f"`samtriton build-engines --model-repository {out_dir}` (the Docker image does it at start)")
    return BuildResult(out_dir, weights, parity, time.perf_counter() - started, default,
                       {k: v for k, v in steps.items() if v is not None})
