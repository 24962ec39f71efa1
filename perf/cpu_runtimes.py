"""Encoder and decoder time for each CPU runtime x precision, with the accuracy gate's figures.

    .venv/bin/python perf/cpu_runtimes.py --model-repository var/model_repository [--model NAME ...]

For each variant in the repository (its model.onnx files, whatever runtime
the repository serves them with): ONNX Runtime fp32 (the reference), OpenVINO
fp32 and OpenVINO bf16 (skipped, and said so, on CPUs without native bf16).
Medians of --runs calls, all cores, a 1024x683 JPEG's preprocessed image:
encoder 1 image, decoder 1 box and 47 boxes in one call.  The gate's figures
(`samtriton.build.accuracy_gate`, the same code `samtriton build` runs) for
each step alone and for both steps in the same runtime.  Prints a table per
variant and writes perf/results/cpu_runtimes.csv.
"""

from __future__ import annotations

import argparse
import csv
import gc
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import RESULTS, jpeg, machine, median_ms  # noqa: E402

from samtriton import spec  # noqa: E402
from samtriton.build import accuracy_gate as gate  # noqa: E402
from samtriton.sample_image import sample_scene  # noqa: E402
from samtriton.serving import cpu_runtime, decoder_batch  # noqa: E402
from samtriton.serving.preprocessing import PreprocessSettings, preprocess  # noqa: E402
from samtriton.serving.prompts import PromptInputs, build_prompts  # noqa: E402
from samtriton.variants import get_variant  # noqa: E402

CHOICES = [cpu_runtime.StepRuntime(), cpu_runtime.StepRuntime("openvino", "fp32"),
           cpu_runtime.StepRuntime("openvino", "bf16")]


def many_boxes(n: int = 47) -> np.ndarray:
    _, boxes = sample_scene(1024, 683)
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, [900, 560], size=(n, 2))
    extra = np.concatenate([corners, corners + rng.uniform(30, 120, size=(n, 2))], axis=1)
    return np.concatenate([boxes, extra]).astype(np.float32)[:n]


def timed_calls(path: Path, choice, calls) -> list[float]:
    """Median ms of each (feeds, runs) in `calls` on a session of its own, released after."""
    def medians(session):
        return [median_ms(lambda feeds=feeds: session.run(None, feeds), runs) for feeds, runs in calls]

    times = medians(cpu_runtime.make_session(path, choice))
    gc.collect()  # the session goes before the next one is timed
    return times


def variant_rows(repo: Path, name: str, runs: int, log=print) -> list[dict]:
    variant = get_variant(name)
    names = spec.model_names(variant.slug)
    encoder_onnx = repo / names.image_encoder / "1" / "model.onnx"
    decoder_onnx = repo / names.mask_decoder / "1" / "model.onnx"
    settings = PreprocessSettings.for_variant(variant)
    boxes = many_boxes()
    pre = preprocess(jpeg(0), PromptInputs(boxes=boxes), settings)
    pixels = pre.pixel_values[np.newaxis]

    embeddings = cpu_runtime.make_session(encoder_onnx).run(None, {spec.PIXEL_VALUES_NAME: pixels})[0]

    def decoder_feeds(n: int):
        prompts = build_prompts(PromptInputs(boxes=boxes[:n]), pre.geometry, settings.limits)
        return decoder_batch.stack([decoder_batch.DecoderRequest.of(embeddings, prompts)], [False]).feeds

    one, all_boxes = decoder_feeds(1), decoder_feeds(len(boxes))
    gate_pixels = gate.sample_pixels(variant.encoder_size, variant.pixel_mean, variant.pixel_std)
    rows = []
    for choice in CHOICES:
        if choice.precision == cpu_runtime.BF16 and not cpu_runtime.native_bf16_flags():
            why = "this CPU has no native bf16"
            log(f"  {choice.label}: skipped, {why}")
            continue
        row = {"model": variant.name, "runtime": choice.runtime, "precision": choice.precision}
        # One session alive while timing: idle sessions of other runtimes (their
        # thread pools) must not share the cores with the one being timed.
        row["encoder_ms"], = timed_calls(encoder_onnx, choice, [({spec.PIXEL_VALUES_NAME: pixels}, runs)])
        row["decoder_1_box_ms"], row["decoder_47_boxes_ms"] = timed_calls(
            decoder_onnx, choice, [(one, runs * 2), (all_boxes, max(3, runs // 2))])
        if not choice.is_reference:
            enc_run = gate.session_runner(cpu_runtime.make_session(encoder_onnx, choice))
            dec_run = gate.session_runner(cpu_runtime.make_session(decoder_onnx, choice))
            ref_enc_run = gate.session_runner(cpu_runtime.make_session(encoder_onnx))
            ref_dec_run = gate.session_runner(cpu_runtime.make_session(decoder_onnx))
            reports = {
                "encoder": gate.judge_encoder(enc_run, ref_enc_run, ref_dec_run, gate_pixels),
                "decoder": gate.judge_decoder(dec_run, ref_dec_run),
                "both": gate.compare(dec_run(gate.decoder_feeds(None, gate.embed(enc_run, gate_pixels))),
                                     ref_dec_run(gate.decoder_feeds(None, gate.embed(ref_enc_run, gate_pixels)))),
            }
            del enc_run, dec_run, ref_enc_run, ref_dec_run
            gc.collect()
            for step, report in reports.items():
                row[f"{step}_gate_mean_iou"] = report.mean_mask_iou
                row[f"{step}_gate_min_iou"] = report.min_mask_iou
                row[f"{step}_gate_max_score_diff"] = report.max_score_diff
                row[f"{step}_gate_passed"] = report.passed()
        rows.append(row)
        log(f"  {choice.label:<18} encoder {row['encoder_ms']:8.1f} ms  decoder 1 box {row['decoder_1_box_ms']:6.1f} ms"
            f"  47 boxes {row['decoder_47_boxes_ms']:7.1f} ms")
    return rows


def print_table(rows: list[dict]) -> None:
    ref = {r["model"]: r for r in rows if r["runtime"] == "onnxruntime"}
    print("\n| model | runtime | precision | encoder ms (x ORT) | decoder 1 box ms (x) | decoder 47 boxes ms (x) "
          "| gate: encoder mean/min IoU, score diff | gate: decoder | gate: both steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = ref[r["model"]]

        def timed(key):
            return f"{r[key]:.1f} ({base[key] / r[key]:.2f}x)"

        def gated(step):
            if f"{step}_gate_mean_iou" not in r:
                return "reference"
            verdict = "pass" if r[f"{step}_gate_passed"] else "FAIL"
            return (f"{r[f'{step}_gate_mean_iou']:.4f} / {r[f'{step}_gate_min_iou']:.4f}, "
                    f"{r[f'{step}_gate_max_score_diff']:.4f} ({verdict})")

        print(f"| {r['model']} | {r['runtime']} | {r['precision']} | {timed('encoder_ms')} | "
              f"{timed('decoder_1_box_ms')} | {timed('decoder_47_boxes_ms')} | {gated('encoder')} | "
              f"{gated('decoder')} | {gated('both')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", default="var/model_repository")
    parser.add_argument("--model", nargs="*", help="variants to time (default: every variant in the repository)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    repo = Path(args.model_repository)
    from samtriton.serving.pipeline import repository_parameters

    models = args.model or repository_parameters(repo, spec.POSTPROCESS)["samtriton_models"].split(",")
    desc = machine()
    print(f"machine: {desc}; medians of {args.runs}")
    rows = []
    for name in models:
        print(f"{name}:")
        rows.extend(variant_rows(repo, name, args.runs))
    print_table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(RESULTS / "cpu_runtimes.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["machine", *keys])
        w.writeheader()
        for r in rows:
            w.writerow({"machine": desc, **{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()}})


if __name__ == "__main__":
    main()
