"""Model variants that `samtriton build` knows, keyed by name.

Each entry carries what the rest of the pipeline must agree on for that model:
the encoder's input size, the pixel normalisation, the official checkpoint's
file name, and how to construct the PyTorch module the checkpoint loads into.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ModelVariant:
    name: str
    description: str
    image_size: int  # longest side of the encoder input; the input is square
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    checkpoint_file: str
    build_module: Callable[[], "object"]  # returns an upstream `Sam` nn.Module, eval mode


def _build_mobilesam():
    # Upstream MobileSAM code (the `mobilesam-mirror` package) is the model
    # definition, so official checkpoints load with their own key names.
    with warnings.catch_warnings():
        # It imports timm's deprecated paths and re-registers TinyViT names.
        warnings.simplefilter("ignore")
        from mobile_sam import sam_model_registry

    return sam_model_registry["vit_t"]()


SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

MODEL_REGISTRY: dict[str, ModelVariant] = {
    v.name: v
    for v in (
        ModelVariant(
            name="mobilesam",
            description="MobileSAM (TinyViT-5M encoder, SAM prompt encoder and mask decoder)",
            image_size=1024,
            pixel_mean=SAM_PIXEL_MEAN,
            pixel_std=SAM_PIXEL_STD,
            checkpoint_file="mobile_sam.pt",
            build_module=_build_mobilesam,
        ),
    )
}

DEFAULT_MODEL = "mobilesam"


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def get_variant(name: str) -> ModelVariant:
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        valid = ", ".join(sorted(MODEL_REGISTRY))
        raise UnknownModelError(f"unknown model {name!r}; valid models: {valid}") from None
