"""PyTorch constructors for the variants of `samtriton.variants`, keyed by family.

The modules come from the upstream packages (`mobilesam-mirror`,
`efficientsam`, `segment-anything`), so the official checkpoints load with
their own key names; the export wrappers (`export_wrappers.py`) are ours.
"""

from __future__ import annotations

import warnings

from torch import nn

from samtriton.variants import DEFAULT_MODEL, MODEL_REGISTRY, ModelVariant, UnknownModelError, get_variant

__all__ = ["DEFAULT_MODEL", "MODEL_REGISTRY", "ModelVariant", "UnknownModelError", "get_variant", "build_module"]


def _mobilesam(variant: ModelVariant) -> nn.Module:
    with warnings.catch_warnings():
        # It imports timm's deprecated paths and re-registers TinyViT names.
        warnings.simplefilter("ignore")
        from mobile_sam import sam_model_registry

    return sam_model_registry["vit_t"]()


def _efficientvit(variant: ModelVariant) -> nn.Module:
    from efficientsam.sam_model_zoo import create_efficientvit_sam_model

    # The zoo function also sets the norm epsilon (1e-6) the weights were trained with.
    return create_efficientvit_sam_model(variant.name, pretrained=False)


def _sam(variant: ModelVariant) -> nn.Module:
    from segment_anything import sam_model_registry

    return sam_model_registry[{"sam-vit-b": "vit_b"}[variant.name]](checkpoint=None)


_BUILDERS = {"mobilesam": _mobilesam, "efficientvit": _efficientvit, "sam": _sam}


def build_module(variant: ModelVariant) -> nn.Module:
    """The upstream model of `variant` with its initial weights, eval mode."""
    module = _BUILDERS[variant.family](variant)
    encoder_size = getattr(module, "image_size", None)
    if isinstance(encoder_size, tuple):  # EfficientViT-SAM: (prompt frame, encoder input)
        assert encoder_size[1] == variant.encoder_size, (variant.name, encoder_size)
    return module.eval()
