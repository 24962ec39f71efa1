"""Write a complete Triton model repository for one model variant (CPU target)."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from samtriton import spec
from samtriton.build import checkpoint as ckpt
from samtriton.build.configs import ServingOptions, WeightsInfo, model_configs, to_pbtxt
from samtriton.build.onnx_export import ParityReport, check_parity, export_decoder, export_encoder
from samtriton.build.registry import ModelVariant

# The python models' sources, laid out as a Triton repository in the project.
MODEL_SOURCES = Path(__file__).resolve().parents[2] / "model_repository"
MODEL_NAMES = (spec.ENSEMBLE, spec.ENCODE_ENSEMBLE, spec.PREPROCESS, spec.IMAGE_ENCODER, spec.MASK_DECODER, spec.POSTPROCESS)
# Placeholder written into the configs committed under model_repository/.
TEMPLATE_WEIGHTS = WeightsInfo(description="set by `samtriton build`", random=False)

RANDOM_BANNER = """\
************************************************************************
*  RANDOM WEIGHTS: this repository was built from a randomly initialised *
*  model. Its masks are meaningless; use it for tests only.              *
*  For real masks: samtriton build --checkpoint mobile_sam.pt ...        *
************************************************************************"""


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    weights: WeightsInfo
    parity: ParityReport
    seconds: float


def write_configs(out_dir: Path, variant: ModelVariant, weights: WeightsInfo, options: ServingOptions) -> None:
    for name, cfg in model_configs(variant, weights, options).items():
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        (out_dir / name / "config.pbtxt").write_text(to_pbtxt(cfg))


def _copy_python_models(out_dir: Path) -> None:
    if not MODEL_SOURCES.is_dir():
        raise FileNotFoundError(f"python model sources not found at {MODEL_SOURCES}")
    for name in MODEL_NAMES:
        version = out_dir / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        src = MODEL_SOURCES / name / "1" / "model.py"
        if src.exists():
            shutil.copy2(src, version / "model.py")
        else:  # the ensemble: an empty version folder
            (version / ".gitkeep").touch()


def build_repository(
    variant: ModelVariant,
    out_dir: str | Path,
    checkpoint: str | Path | None = None,
    random_seed: int | None = None,
    options: ServingOptions = ServingOptions(),
    log=print,
) -> BuildResult:
    """Export ONNX from `checkpoint` (or random weights), check parity, write the repository."""
    if (checkpoint is None) == (random_seed is None):
        raise ValueError("pass exactly one of checkpoint and random_seed")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="samtriton-build-") as tmp:
        if checkpoint is None:
            log(RANDOM_BANNER)
            checkpoint = ckpt.write_random_checkpoint(variant, Path(tmp) / variant.checkpoint_file, random_seed)
            weights = WeightsInfo(f"RANDOM WEIGHTS (seed {random_seed}); masks are meaningless", random=True)
        else:
            weights = WeightsInfo(
                f"checkpoint {Path(checkpoint).name} sha256={ckpt.sha256_of(checkpoint)}", random=False
            )
        log(f"loading {variant.name} from {checkpoint}")
        sam = ckpt.load_model(variant, checkpoint)

        encoder_onnx = out_dir / spec.IMAGE_ENCODER / "1" / "model.onnx"
        decoder_onnx = out_dir / spec.MASK_DECODER / "1" / "model.onnx"
        encoder_onnx.parent.mkdir(parents=True, exist_ok=True)
        decoder_onnx.parent.mkdir(parents=True, exist_ok=True)
        log("exporting image encoder to ONNX")
        export_encoder(sam, variant.image_size, encoder_onnx)
        log("exporting mask decoder to ONNX")
        export_decoder(sam, decoder_onnx)
        log("checking ONNX Runtime against PyTorch")
        parity = check_parity(sam, variant.image_size, encoder_onnx, decoder_onnx)
        for line in parity.lines():
            log("  " + line)

    _copy_python_models(out_dir)
    write_configs(out_dir, variant, weights, options)
    if weights.random:
        log(RANDOM_BANNER)
    log(f"wrote {out_dir} ({weights.description})")
    return BuildResult(out_dir, weights, parity, time.perf_counter() - started)
