"""The CPU target's runtimes and precisions: choice, fallback, the accuracy gate at
build time (and its refusal of a broken model), and the default runtime served
by a real tritonserver against the upstream predictor."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import pytest
from PIL import Image

from samtriton import spec
from samtriton.build import accuracy_gate as gate
from samtriton.build.configs import parse_pbtxt
from samtriton.client import SamClient
from samtriton.serving import cpu_runtime
from samtriton.serving.cpu_runtime import StepRuntime
from tests.conftest import DEFAULT_RUNTIME_MODELS, SAMTRITON, mask_iou, random_boxes
from samtriton.variants import get_variant
from tests.test_ensemble_fidelity import IMAGES

NATIVE_BF16 = cpu_runtime.native_bf16_flags()
NO_BF16_REASON = ("this CPU has no native bf16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo): the build serves fp32 "
                  "instead, and bf16 cannot be measured here")
# Served bf16 (both steps) vs the upstream fp32 predictor, on random weights:
# measured mean IoU 0.988-0.999 per request and scores within 2.6e-3 (the
# gate holds each step to a 0.97 mean low-res IoU against fp32 ONNX Runtime).
BF16_MIN_MEAN_IOU = 0.98
BF16_MAX_SCORE_DIFF = 0.01

CPUINFO_WITHOUT_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl\n"
CPUINFO_WITH_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n"


def test_step_runtime_choices_are_checked_with_the_valid_names():
    assert StepRuntime() == StepRuntime("onnxruntime", "fp32")
    assert StepRuntime.from_parameters({}) == StepRuntime()  # repositories built before the choice
    assert StepRuntime.from_parameters({"runtime": "openvino", "precision": "bf16"}).label == "openvino bf16"
    assert StepRuntime().is_reference and not StepRuntime("openvino", "fp32").is_reference
    with pytest.raises(ValueError, match="onnxruntime runs fp32 only; bf16 needs the openvino runtime"):
        StepRuntime("onnxruntime", "bf16")
    with pytest.raises(ValueError, match="valid runtimes: onnxruntime, openvino"):
        StepRuntime("tensorflow")
    with pytest.raises(ValueError, match="valid precisions: fp32, bf16"):
        StepRuntime("openvino", "int8")


def test_bf16_only_on_cpus_with_native_bf16():
    bf16 = StepRuntime("openvino", "bf16")
    assert cpu_runtime.native_bf16_flags(CPUINFO_WITHOUT_BF16) == []
    assert cpu_runtime.native_bf16_flags(CPUINFO_WITH_AMX) == ["amx_bf16"]
    assert cpu_runtime.resolve(bf16, spec.IMAGE_ENCODER, CPUINFO_WITH_AMX) == (bf16, None)
    # Each step's fastest fp32 runtime, as measured.
    fallback, why = cpu_runtime.resolve(bf16, spec.IMAGE_ENCODER, CPUINFO_WITHOUT_BF16)
    assert fallback == StepRuntime("openvino", "fp32")
    assert "no native bf16" in why and "openvino fp32 instead of openvino bf16" in why
    fallback, why = cpu_runtime.resolve(bf16, spec.MASK_DECODER, CPUINFO_WITHOUT_BF16)
    assert fallback == StepRuntime("onnxruntime", "fp32") and "onnxruntime fp32 instead" in why
    # fp32 needs nothing.
    assert cpu_runtime.resolve(StepRuntime("openvino", "fp32"), spec.MASK_DECODER, CPUINFO_WITHOUT_BF16)[1] is None


def test_sam_vit_falls_back_to_onnxruntime_for_its_encoder():
    # ONNX Runtime fp32 ran SAM ViT's encoder faster than OpenVINO fp32 in every run, in less memory.
    bf16 = StepRuntime("openvino", "bf16")
    for model, encoder in (("sam-vit-b", "onnxruntime"), ("mobilesam", "openvino"),
                           ("efficientvit-sam-l0", "openvino")):
        family = get_variant(model).family
        assert cpu_runtime.resolve(bf16, spec.IMAGE_ENCODER, CPUINFO_WITHOUT_BF16, family)[0] == StepRuntime(encoder)
        assert cpu_runtime.resolve(bf16, spec.MASK_DECODER, CPUINFO_WITHOUT_BF16, family)[0] == StepRuntime()
        assert cpu_runtime.resolve(bf16, spec.IMAGE_ENCODER, CPUINFO_WITH_AMX, family)[0] == bf16
        # What a served step resolves from its config: the variant is its `samtriton_model` parameter.
        params = {**bf16.to_parameters(), "samtriton_model": model}
        resolved, _ = cpu_runtime.resolve_configured(params, spec.IMAGE_ENCODER, CPUINFO_WITHOUT_BF16)
        assert resolved == StepRuntime(encoder)
    # A repository from before the parameter: the per-role fallback.
    assert cpu_runtime.resolve_configured(bf16.to_parameters(), spec.IMAGE_ENCODER,
                                          CPUINFO_WITHOUT_BF16)[0] == StepRuntime("openvino")


def test_the_build_resolves_each_step_for_its_variant(tmp_path):
    from samtriton.build.cpu_steps import choose_steps

    bf16 = StepRuntime("openvino", "bf16")
    # Both fallbacks are the fp32 ONNX Runtime reference, so no gate runs and no file is opened.
    steps = choose_steps(get_variant("sam-vit-b"), tmp_path / "missing.onnx", tmp_path / "missing.onnx", bf16, bf16,
                         log=lambda _: None, cpuinfo=CPUINFO_WITHOUT_BF16)
    assert steps.encoder.runtime == StepRuntime()
    assert "onnxruntime fp32 instead of openvino bf16" in steps.encoder.fallback
    assert steps.decoder.runtime == StepRuntime() and steps.encoder.gate is None and steps.decoder.gate is None
    assert steps.encoder.to_parameters()["gate"].startswith("reference")


def test_build_flags_are_checked(tmp_path):
    for flags, message in (
        (["--encoder-runtime", "onnxruntime", "--encoder-precision", "bf16"], "bf16 needs the openvino runtime"),
        (["--decoder-precision", "fp16"], "invalid choice"),
        (["--target", "gpu", "--encoder-runtime", "openvino"], "the GPU target runs TensorRT"),
    ):
        proc = subprocess.run([*SAMTRITON, "build", "--random-weights", "--out", str(tmp_path / "r"), *flags],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert message in proc.stderr
        assert not (tmp_path / "r").exists()


def _params(repo, model: str) -> dict[str, str]:
    return {k: v.string_value for k, v in parse_pbtxt((repo / model / "config.pbtxt").read_text()).parameters.items()}


def test_default_build_gates_each_step_and_records_the_figures(default_runtime_repository):
    repo, log = default_runtime_repository
    listing = subprocess.run([*SAMTRITON, "models", "--model-repository", str(repo)], capture_output=True,
                             text=True, timeout=120, check=True).stdout
    for model in DEFAULT_RUNTIME_MODELS:
        names = spec.model_names(get_variant(model).slug)
        for role in (spec.IMAGE_ENCODER, spec.MASK_DECODER):
            step = names.of(role)
            expected, _ = cpu_runtime.resolve(StepRuntime("openvino", "bf16"), role, family=get_variant(model).family)
            params = _params(repo, step)
            assert (params["runtime"], params["precision"]) == (expected.runtime, expected.precision)
            if expected.is_reference:  # a decoder's fallback on a CPU without bf16
                assert params["gate"].startswith("reference")
                continue
            assert params["gate"] == "passed"
            report = gate.GateReport(float(params["gate_min_mask_iou"]), float(params["gate_mean_mask_iou"]),
                                     float(params["gate_max_score_diff"]))
            assert report.passed()
            assert (f"{step:<34} {expected.label}  gate: passed: mean mask IoU {params['gate_mean_mask_iou']}"
                    in listing)
            assert f"[{model}] {role}: accuracy gate for {expected.label} against fp32 ONNX Runtime" in log
    assert "mask IoU vs fp32 ONNX Runtime: mean" in log
    if not NATIVE_BF16:
        assert "no native bf16" in log


def test_without_native_bf16_each_step_takes_its_fp32_fallback(default_runtime_repository):
    """The build's choice on a CPU without bf16 (its /proc/cpuinfo given), on the real graphs."""
    from samtriton.build.cpu_steps import choose_steps

    repo, _ = default_runtime_repository
    names = spec.model_names("mobilesam")
    lines = []
    steps = choose_steps(get_variant("mobilesam"), repo / names.image_encoder / "1" / "model.onnx",
                         repo / names.mask_decoder / "1" / "model.onnx", StepRuntime("openvino", "bf16"),
                         StepRuntime("openvino", "bf16"), log=lines.append, cpuinfo=CPUINFO_WITHOUT_BF16)
    assert steps.encoder.runtime == StepRuntime("openvino", "fp32") and steps.encoder.gate.mean_mask_iou > 0.999
    assert steps.decoder.runtime == StepRuntime() and steps.decoder.gate is None
    assert steps.decoder.to_parameters() == {"runtime": "onnxruntime", "precision": "fp32",
                                             "gate": "reference (fp32 ONNX Runtime)"}
    assert "asked for openvino bf16, but this CPU has no native bf16" in steps.decoder.summary()
    assert sum("no native bf16" in line for line in lines) == 2


def test_reference_build_records_the_reference(built_repository):
    repo, log = built_repository
    params = _params(repo, spec.model_names("mobilesam").image_encoder)
    assert (params["runtime"], params["precision"]) == ("onnxruntime", "fp32")
    assert params["gate"].startswith("reference")
    assert "accuracy gate for" not in log


def _corrupt(onnx_path, out_path, scale: float):
    """A copy of the graph with every float initializer of the decoder's output
    heads scaled: what a miscompiled or badly quantised model looks like."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    touched = 0
    for init in model.graph.initializer:
        if "output_hypernetworks_mlps" in init.name or "iou_prediction_head" in init.name:
            arr = numpy_helper.to_array(init)
            if arr.dtype == np.float32:
                init.CopyFrom(numpy_helper.from_array(arr * scale + 0.05, init.name))
                touched += 1
    assert touched, "no output-head weights found to corrupt"
    onnx.save(model, str(out_path))


def test_the_gate_refuses_a_broken_model_and_writes_nothing(default_runtime_repository, random_checkpoints,
                                                           tmp_path, monkeypatch):
    """The real build, with the OpenVINO decoder fed a corrupted copy of its
    graph: the gate refuses it, names the step and the way out, and the
    repository that was there stays as it was."""
    from samtriton.build import cpu_steps
    from samtriton.build.configs import ServingOptions
    from samtriton.build.repository import ModelSource, build_repository
    from samtriton.variants import get_variant

    real_make_session = cpu_steps.make_session
    broken = tmp_path / "broken_decoder.onnx"

    def make_session(path, step, **kwargs):
        if step.runtime == "openvino" and "mask_decoder" in str(path):
            if not broken.exists():
                _corrupt(path, broken, 0.6)
            path = broken
        return real_make_session(path, step, **kwargs)

    monkeypatch.setattr(cpu_steps, "make_session", make_session)
    out = tmp_path / "repo"
    out.mkdir()
    (out / "previous").write_text("kept")
    lines = []
    options = ServingOptions(encoder_runtime=StepRuntime(), decoder_runtime=StepRuntime("openvino", "fp32"))
    with pytest.raises(gate.GateError) as failure:
        build_repository([ModelSource(get_variant("mobilesam"), checkpoint=random_checkpoints["mobilesam"])], out,
                         options=options, log=lines.append)
    message = str(failure.value)
    assert "mobilesam: the mask_decoder in openvino fp32 fails the accuracy gate" in message
    assert "--decoder-runtime onnxruntime" in message
    report_line = next(line for line in lines if "mask IoU vs fp32 ONNX Runtime" in line)
    mean_iou = float(report_line.split("mean ")[1].split(" ")[0])
    score_diff = float(report_line.split("max |diff| ")[1].split(" ")[0])
    assert mean_iou < gate.GateReport.MIN_MEAN_IOU or score_diff > gate.GateReport.MAX_SCORE_DIFF
    assert [p.name for p in out.iterdir()] == ["previous"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.")]  # no staging left behind


def test_the_gate_passes_the_same_graph_uncorrupted(default_runtime_repository):
    """The control of the test above: the same decoder graph, untouched, in
    OpenVINO fp32 passes with near-identical masks."""
    repo, _ = default_runtime_repository
    onnx_path = repo / spec.model_names("mobilesam").mask_decoder / "1" / "model.onnx"
    reference = gate.session_runner(cpu_runtime.make_session(onnx_path))
    report = gate.judge_decoder(gate.session_runner(cpu_runtime.make_session(onnx_path, StepRuntime("openvino"))),
                                reference)
    assert report.passed() and report.mean_mask_iou > 0.999 and report.max_score_diff < 1e-3


BF16_CASES = ([("mobilesam", name, n) for name in IMAGES for n in ((5, 47) if "webp" not in name else (5,))]
              + [("efficientvit-sam-l0", name, 5) for name in IMAGES])


@pytest.mark.integration
@pytest.mark.skipif(not NATIVE_BF16, reason=NO_BF16_REASON)
@pytest.mark.parametrize("model,image_name,n_boxes", BF16_CASES, ids=[f"{m}-{n}-{b}boxes" for m, n, b in BF16_CASES])
def test_served_bf16_masks_match_upstream_predictor(default_runtime_server, upstream_predictors, model, image_name,
                                                    n_boxes):
    from PIL import ImageOps

    image_bytes = IMAGES[image_name]
    width, height = ImageOps.exif_transpose(Image.open(io.BytesIO(image_bytes))).size
    boxes = random_boxes(np.random.default_rng(n_boxes * 7 + len(image_name)), n_boxes, width, height)
    with SamClient(default_runtime_server.grpc_url, model=model) as client:
        served = client.segment(image_bytes, boxes)
    ref_masks, ref_scores = upstream_predictors(model).predict(image_bytes, boxes)
    ious = mask_iou(served.masks, ref_masks)
    score_diff = np.abs(served.scores - ref_scores).max()
    print(f"\nbf16 {model} {image_name} {n_boxes} boxes: mean IoU {ious.mean():.5f} min IoU {ious.min():.5f} "
          f"max |score diff| {score_diff:.2e}")
    assert ref_masks.any()
    assert ious.mean() >= BF16_MIN_MEAN_IOU
    assert score_diff <= BF16_MAX_SCORE_DIFF
