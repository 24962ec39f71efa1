"""The model zoo as one table: what each SAM-family variant needs at build and serve time.

Torch-free on purpose: the SDK, the CLI's listings and the Triton python
models read it; only `samtriton.build.registry` attaches the PyTorch
constructors.

Every variant keeps SAM's prompt encoder and mask decoder, which work in a
1024-long-side frame (`spec.PROMPT_SIZE`) whatever the encoder's input size:
EfficientViT-SAM L0-L2 resize the image to 512 for their encoder, but boxes
and the mask upsampling stay in the 1024 frame.
"""

from __future__ import annotations

from dataclasses import dataclass

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

_EFFICIENTVIT_URL = "https://huggingface.co/mit-han-lab/efficientvit-sam/resolve/main/{}"


@dataclass(frozen=True)
class ModelVariant:
    name: str  # what users type: `samtriton build --model NAME`
    slug: str  # prefix of its Triton model names (sam_<slug>, <slug>_image_encoder, ...)
    family: str  # which upstream code defines it: mobilesam, efficientvit, sam
    description: str
    encoder_size: int  # the encoder's square input: longest side after resize, padded
    parameters: int  # in the whole model (encoder + prompt encoder + decoder)
    checkpoint_file: str  # the official file name, as published
    checkpoint_url: str
    # sha256 of the official file where samtriton records one; None: a download
    # needs --checkpoint-sha256 (nothing unverified is loaded silently).
    checkpoint_sha256: str | None
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD

    @property
    def ensemble(self) -> str:
        return f"sam_{self.slug}"

    @property
    def encode_ensemble(self) -> str:
        return f"sam_encode_{self.slug}"


def _efficientvit(size: str, encoder_size: int, parameters: int, sha256: str | None) -> ModelVariant:
    file = f"efficientvit_sam_{size}.pt"
    return ModelVariant(
        name=f"efficientvit-sam-{size}",
        slug=f"efficientvit_{size}",
        family="efficientvit",
        description=f"EfficientViT-SAM-{size.upper()} (EfficientViT encoder, SAM prompt encoder and mask decoder)",
        encoder_size=encoder_size,
        parameters=parameters,
        checkpoint_file=file,
        checkpoint_url=_EFFICIENTVIT_URL.format(file),
        checkpoint_sha256=sha256,
    )


# Parameter counts are those of the modules the official checkpoints load into
# (checked against the built modules in tests).  The recorded sha256 values
# are those published alongside the files; variants without one are listed
# in the README with what to do.
MODEL_REGISTRY: dict[str, ModelVariant] = {
    v.name: v
    for v in (
        ModelVariant(
            name="mobilesam",
            slug="mobilesam",
            family="mobilesam",
            description="MobileSAM (TinyViT-5M encoder, SAM prompt encoder and mask decoder)",
            encoder_size=1024,
            parameters=10_130_092,
            checkpoint_file="mobile_sam.pt",
            checkpoint_url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
            checkpoint_sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        ),
        _efficientvit("l0", 512, 34_792_784, "c4f994b01a16d48bcf2fbbb089448cfbf58fae5811edfa8113c953b8b8cc64b8"),
        _efficientvit("l1", 512, 47_650_128, None),
        _efficientvit("l2", 512, 61_328_592, None),
        _efficientvit("xl0", 1024, 116_957_904, None),
        _efficientvit("xl1", 1024, 203_346_128, None),
        ModelVariant(
            name="sam-vit-b",
            slug="vit_b",
            family="sam",
            description="Segment Anything ViT-B (Meta's original SAM, base encoder)",
            encoder_size=1024,
            parameters=93_735_472,
            checkpoint_file="sam_vit_b_01ec64.pth",
            checkpoint_url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
            checkpoint_sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
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
        valid = ", ".join(MODEL_REGISTRY)
        raise UnknownModelError(f"unknown model {name!r}; valid models: {valid}") from None
