"""Official-checkpoint loading and random checkpoints in the same layout."""

from __future__ import annotations

from pathlib import Path

import torch

from samtriton.build.registry import ModelVariant, build_module

# Wrappers some training scripts put around the state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


class CheckpointError(ValueError):
    pass


def _unwrap(obj) -> dict:
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], dict):
                return _unwrap(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError("checkpoint holds no state dict of tensors (looked at the top level and under "
                          + ", ".join(repr(k) for k in _WRAPPER_KEYS) + ")")


def _first(keys, n=5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_model(variant: ModelVariant, checkpoint: str | Path) -> torch.nn.Module:
    """Build `variant` and load an official checkpoint file into it (strict)."""
    try:
        raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read checkpoint {checkpoint}: {e}") from e
    state = _unwrap(raw)
    # Some exports prefix every key with "module." (DataParallel) or "model.".
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    model = build_module(variant)
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        raise CheckpointError(
            f"{checkpoint} does not fit model {variant.name!r} ({'; '.join(parts)})"
        )
    wrong_shape = [k for k in expected if expected[k].shape != state[k].shape]
    if wrong_shape:
        k = wrong_shape[0]
        raise CheckpointError(
            f"{checkpoint} does not fit model {variant.name!r}: {k} has shape "
            f"{tuple(state[k].shape)}, the model expects {tuple(expected[k].shape)}"
        )
    model.load_state_dict(state, strict=True)
    # eval() after loading: TinyViT caches its attention biases in a
    # non-persistent buffer when switched to eval mode, so doing it before the
    # load would keep the initial (zero) biases.
    model.train(True)
    model.eval()
    return model


def random_state_dict(variant: ModelVariant, seed: int) -> dict[str, torch.Tensor]:
    """A random-weight state dict in the official layout of `variant`.

    Tensors that the modules initialise to a constant are randomised too, so
    that tests exercise them: TinyViT's attention biases (zero at init) and the
    batch-norm running statistics of EfficientViT (mean 0, variance 1 at init,
    under which a wrong epsilon or a dropped normalisation would go unseen).
    """
    torch.manual_seed(seed)
    model = build_module(variant)
    generator = torch.Generator().manual_seed(seed + 1)
    state = model.state_dict()
    for name, tensor in state.items():
        if name.endswith("attention_biases"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
        elif name.endswith("running_mean"):
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
        elif name.endswith("running_var"):
            tensor.copy_(torch.empty(tensor.shape).uniform_(0.5, 2.0, generator=generator))
    return {k: v.clone() for k, v in state.items()}


def write_random_checkpoint(variant: ModelVariant, path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_state_dict(variant, seed), path)
    return path
