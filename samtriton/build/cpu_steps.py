"""The CPU target's runtime and precision per step, checked by the accuracy gate at build time.

`samtriton build` exports fp32 ONNX graphs and checks them against PyTorch
(the parity check).  Then each step is set to run in the runtime and
precision asked for (`samtriton.serving.cpu_runtime`); anything other than
the fp32 ONNX Runtime reference is judged by the accuracy gate against it on
the build's own checkpoint, and a step that fails refuses the repository.
The chosen runtime and the gate's figures go into the step's config
parameters, where `samtriton models --model-repository` shows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from samtriton import spec
from samtriton.build import accuracy_gate as gate
from samtriton.build.memory import release_memory
from samtriton.serving.cpu_runtime import BF16, OPENVINO, StepRuntime, make_session, resolve
from samtriton.variants import ModelVariant

# The default of each step, chosen by perf/cpu_runtimes.py (perf/README.md):
# OpenVINO bf16 was the fastest for both steps of MobileSAM, EfficientViT-SAM-L0
# and SAM ViT-B, and within the gate; on a CPU without native bf16 each step
# falls back to its fastest fp32 runtime (cpu_runtime.fp32_fallback).
DEFAULT_ENCODER = StepRuntime(OPENVINO, BF16)
DEFAULT_DECODER = StepRuntime(OPENVINO, BF16)


@dataclass(frozen=True)
class StepChoice:
    """What one step of a built repository runs with, and why."""

    requested: StepRuntime
    runtime: StepRuntime
    fallback: str | None = None  # why `runtime` is not `requested`
    gate: gate.GateReport | None = None  # None: the reference itself

    def summary(self) -> str:
        text = self.runtime.label
        if self.gate is not None:
            text += (f" (gate: mean mask IoU {self.gate.mean_mask_iou:.4f}, "
                     f"max score diff {self.gate.max_score_diff:.4f})")
        if self.fallback:
            text += f"; asked for {self.requested.label}, but {self.fallback}"
        return text

    def to_parameters(self) -> dict[str, str]:
        params = self.runtime.to_parameters()
        if self.runtime.is_reference:
            params["gate"] = "reference (fp32 ONNX Runtime)"
        elif self.gate is None:
            params["gate"] = "set by `samtriton build`"
        else:
            params["gate"] = "passed"
            params.update(self.gate.to_parameters())
        return params


@dataclass(frozen=True)
class VariantSteps:
    encoder: StepChoice
    decoder: StepChoice

    @classmethod
    def unchecked(cls, encoder: StepRuntime, decoder: StepRuntime) -> "VariantSteps":
        """The steps as asked, before a build resolved and gated them (the committed template)."""
        return cls(StepChoice(encoder, encoder), StepChoice(decoder, decoder))


def _runner(path: Path, step: StepRuntime) -> gate.Run:
    # No arena: the reference's activations are returned after each run, which
    # keeps the build's peak down (ViT-B's encoder activations are GBs).
    return gate.session_runner(make_session(path, step, memory_arena=False))


def choose_steps(variant: ModelVariant, encoder_onnx: Path, decoder_onnx: Path, encoder: StepRuntime,
                 decoder: StepRuntime, log=print, cpuinfo: str | None = None) -> VariantSteps:
    """Resolve each step's runtime on this CPU and gate it; raises GateError
    when a step falls short (the repository is not written)."""
    reference = StepRuntime()
    choices = {}
    for role, onnx_path, requested in ((spec.IMAGE_ENCODER, encoder_onnx, encoder),
                                       (spec.MASK_DECODER, decoder_onnx, decoder)):
        runtime, why = resolve(requested, role, cpuinfo, variant.family)
        if why:
            log(f"[{variant.name}] {role}: {why}")
        report = None
        if not runtime.is_reference:
            log(f"[{variant.name}] {role}: accuracy gate for {runtime.label} against fp32 ONNX Runtime")
            if role == spec.IMAGE_ENCODER:
                # One encoder session at a time, freed before the next (ViT-B's take GBs).
                pixels = gate.sample_pixels(variant.encoder_size, variant.pixel_mean, variant.pixel_std)
                emb_ref = gate.embed(_runner(onnx_path, reference), pixels)
                release_memory()
                emb_got = gate.embed(_runner(onnx_path, runtime), pixels)
                release_memory()
                report = gate.judge_embeddings(emb_got, emb_ref, _runner(decoder_onnx, reference))
            else:
                report = gate.judge_decoder(_runner(onnx_path, runtime), _runner(onnx_path, reference))
            release_memory()
            log(f"  {report.line()}")
            if not report.passed():
                raise gate.GateError(
                    f"{variant.name}: the {role} in {runtime.label} fails the accuracy gate ({report.line()}); "
                    f"nothing was written. Build it with --{role.split('_')[-1]}-runtime onnxruntime "
                    f"or --{role.split('_')[-1]}-precision fp32.")
        log(f"[{variant.name}] {role}: {runtime.label}")
        choices[role] = StepChoice(requested, runtime, why, report)
    return VariantSteps(choices[spec.IMAGE_ENCODER], choices[spec.MASK_DECODER])
