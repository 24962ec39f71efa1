"""The CPU runtimes a step can run its ONNX graph in, and at which precision.

`onnxruntime` runs fp32 only.  `openvino` (the runtime behind Triton's own
openvino backend) runs fp32 or bf16; bf16 is only worth having, and only
chosen, on CPUs with native bf16 arithmetic (avx512_bf16 or AMX), where it
halves the encoder's time.  Elsewhere OpenVINO would emulate it slowly, so the
build falls back to fp32 and says so.

Both runtimes are wrapped to answer `run(output_names, feeds)` as an ONNX
Runtime session does, so the python models and the in-process pipeline call
one interface whatever the repository was built with.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samtriton import spec
from samtriton.variants import get_variant

ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
RUNTIMES = (ONNXRUNTIME, OPENVINO)
FP32 = "fp32"
BF16 = "bf16"
PRECISIONS = (FP32, BF16)
# /proc/cpuinfo flags of native bf16 arithmetic.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class StepRuntime:
    """How one step (encoder or decoder) runs on the CPU."""

    runtime: str = ONNXRUNTIME
    precision: str = FP32

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown CPU runtime {self.runtime!r}; valid runtimes: {', '.join(RUNTIMES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; valid precisions: {', '.join(PRECISIONS)}")
        if self.precision == BF16 and self.runtime != OPENVINO:
            raise ValueError(f"{self.runtime} runs fp32 only; bf16 needs the {OPENVINO} runtime")

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.precision}"

    @property
    def is_reference(self) -> bool:
        """The fp32 ONNX Runtime reference every other choice is gated against."""
        return self == StepRuntime()

    def to_parameters(self) -> dict[str, str]:
        return {"runtime": self.runtime, "precision": self.precision}

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "StepRuntime":
        """A step model's config parameters (repositories from before the choice: ONNX Runtime fp32)."""
        return cls(params.get("runtime", ONNXRUNTIME), params.get("precision", FP32))


def native_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 flags this CPU reports (empty: none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return [f for f in BF16_CPU_FLAGS if f in flags]


# Where bf16 is not native, each step falls back to the fp32 runtime that was
# fastest for it (perf/cpu_runtimes.py, perf/README.md): OpenVINO for the
# encoder (1.1x to 2.2x ONNX Runtime's speed for MobileSAM and
# EfficientViT-SAM-L0), ONNX Runtime for the decoder (OpenVINO fp32 ran it at
# 0.64-0.85x, and at 0.77-1.14x since the channels-last decoder graph: not
# enough to switch).  SAM ViT's encoder is the exception: OpenVINO fp32 ran it
# at 0.84-0.97x in every run, on all three hosts, and held 2.35 GB resident
# against ONNX Runtime's 1.52 GB (one image, the AMD EPYC without bf16), so
# it falls back to ONNX Runtime.  fp32 in either is the reference's masks.
FP32_FALLBACK = {"image_encoder": StepRuntime(OPENVINO, FP32), "mask_decoder": StepRuntime(ONNXRUNTIME, FP32)}
# Per variant family (`samtriton.variants`), where it differs from FP32_FALLBACK.
FP32_FALLBACK_BY_FAMILY = {"sam": {"image_encoder": StepRuntime(ONNXRUNTIME, FP32)}}


def fp32_fallback(role: str, family: str | None = None) -> StepRuntime:
    """The fp32 runtime step `role` of a variant of `family` takes on a CPU without native bf16."""
    return FP32_FALLBACK_BY_FAMILY.get(family, {}).get(role, FP32_FALLBACK[role])


def resolve(choice: StepRuntime, role: str, cpuinfo: str | None = None,
            family: str | None = None) -> tuple[StepRuntime, str | None]:
    """`choice` for step `role` ("image_encoder", "mask_decoder") of a variant of
    `family`, or its fp32 fallback on a CPU without native bf16, with the reason."""
    if choice.precision == BF16 and not native_bf16_flags(cpuinfo):
        fallback = fp32_fallback(role, family)
        return fallback, (f"this CPU has no native bf16 ({' or '.join(BF16_CPU_FLAGS)} not in /proc/cpuinfo): "
                          f"{fallback.label} instead of {choice.label}")
    return choice, None


def resolve_configured(params: dict[str, str], role: str, cpuinfo: str | None = None) -> tuple[StepRuntime, str | None]:
    """What a built step model runs with on this CPU: the runtime and precision its
    config parameters name, resolved for its variant (`spec.VARIANT_PARAMETER`)."""
    model = params.get(spec.VARIANT_PARAMETER)
    return resolve(StepRuntime.from_parameters(params), role, cpuinfo, get_variant(model).family if model else None)


class OpenVinoSession:
    """An OpenVINO compiled model answering ONNX Runtime's `run(output_names, feeds)`."""

    def __init__(self, path: str, precision: str = FP32, threads: int = 0):
        import openvino as ov

        core = ov.Core()
        # OpenVINO picks bf16 on its own where the CPU has it: the precision is set
        # explicitly so that fp32 means fp32.  No pinning: OpenVINO pins a process's threads
        # as if the cores were its own, and each Triton step is a process of its own
        # (perf/serving_overhead.py: as fast without in two runs, 7-11 % faster on both
        # sides in one).
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == BF16 else "f32",
                  "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        model = core.read_model(path)
        # The graph's own output names: a compiled output also answers to the
        # names of the node that now produces it, any of which get_any_name() may give.
        self.output_names = [out.get_any_name() for out in model.outputs]
        self.compiled = core.compile_model(model, "CPU", config)
        self._request = self.compiled.create_infer_request()
        # One infer request, so one call at a time (an instance's execute() is serial anyway).
        self._lock = threading.Lock()

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = self.output_names if output_names is None else output_names
        with self._lock:
            # Reads the caller's arrays in place (they outlive the call); copies the outputs.
            results = self._request.infer(feeds, share_inputs=True)
            by_name = dict(zip(self.output_names, results.values()))
        return [by_name[name] for name in names]


def make_session(path: str | Path, step: StepRuntime = StepRuntime(), threads: int = 0, memory_arena: bool = True):
    """A session for the ONNX graph at `path` in `step`'s runtime and precision
    (`threads` 0: every core).  `memory_arena=False` has ONNX Runtime give its
    activations back after each run (a build's lower peak; slower)."""
    if step.runtime == OPENVINO:
        return OpenVinoSession(str(path), step.precision, threads)
    from samtriton.serving.onnx_runtime import make_session as make_onnxruntime_session

    return make_onnxruntime_session(str(path), intra_op_threads=threads, memory_arena=memory_arena)
