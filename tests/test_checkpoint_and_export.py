"""Checkpoint loading in the official layout, and ONNX parity with PyTorch."""

from __future__ import annotations

import pytest
import torch

from samtriton import spec
from samtriton.build.checkpoint import CheckpointError, load_model, random_state_dict
from samtriton.build.onnx_export import check_parity
from samtriton.build.registry import UnknownModelError, get_variant

VARIANT = get_variant("mobilesam")


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownModelError, match="valid models: mobilesam"):
        get_variant("sam-vit-z")


def test_random_checkpoint_has_official_layout():
    state = random_state_dict(VARIANT, seed=1)
    prefixes = {k.split(".")[0] for k in state}
    assert prefixes == {"image_encoder", "prompt_encoder", "mask_decoder"}
    # TinyViT initialises attention biases to zero; the random checkpoint must not.
    biases = [v for k, v in state.items() if k.endswith("attention_biases")]
    assert biases and all(b.abs().sum() > 0 for b in biases)


def test_loaded_model_uses_checkpoint_attention_biases(random_checkpoint):
    model = load_model(VARIANT, random_checkpoint)
    state = torch.load(random_checkpoint, weights_only=True)
    attn = next(m for m in model.modules() if hasattr(m, "attention_bias_idxs"))
    name = next(k for k, v in model.named_modules() if v is attn)
    expected = state[f"{name}.attention_biases"][:, attn.attention_bias_idxs]
    # The eval-mode cache must be rebuilt from the loaded biases, not the init zeros.
    assert torch.equal(attn.ab, expected)


def test_wrapped_and_prefixed_checkpoints_load(tmp_path):
    state = random_state_dict(VARIANT, seed=2)
    for i, obj in enumerate([{"state_dict": state}, {"model": {f"module.{k}": v for k, v in state.items()}}]):
        path = tmp_path / f"wrapped{i}.pt"
        torch.save(obj, path)
        model = load_model(VARIANT, path)
        key = "mask_decoder.iou_token.weight"
        assert torch.equal(model.state_dict()[key], state[key])


def test_mismatched_checkpoint_names_keys(tmp_path):
    state = random_state_dict(VARIANT, seed=3)
    state.pop("mask_decoder.iou_token.weight")
    state["mask_decoder.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_model(VARIANT, path)
    msg = str(info.value)
    assert "missing keys: mask_decoder.iou_token.weight" in msg
    assert "unexpected keys: mask_decoder.extra_head.weight" in msg


def test_wrong_shape_and_garbage_checkpoints(tmp_path):
    state = random_state_dict(VARIANT, seed=4)
    state["mask_decoder.iou_token.weight"] = torch.zeros(2, 256)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match="iou_token.weight has shape"):
        load_model(VARIANT, tmp_path / "shape.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_model(VARIANT, tmp_path / "junk.pt")


def test_onnx_matches_pytorch(built_repository, random_checkpoint):
    repo, build_output = built_repository
    assert "max |onnx - torch|" in build_output  # the build prints its parity figures
    sam = load_model(VARIANT, random_checkpoint)
    report = check_parity(
        sam,
        VARIANT.image_size,
        repo / spec.IMAGE_ENCODER / "1" / "model.onnx",
        repo / spec.MASK_DECODER / "1" / "model.onnx",
        seed=7,
    )
    print("\n" + "\n".join(report.lines()))
    # Encoder at batch 2 (a frozen batch size would fail to run or diverge),
    # decoder with boxes of two images in one call.
    assert report.encoder_max_abs_diff < 1e-3
    assert report.decoder_mask_max_abs_diff < 1e-3
    assert report.decoder_iou_max_abs_diff < 1e-4
