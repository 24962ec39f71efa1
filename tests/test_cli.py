"""The `samtriton` command as users run it: build, segment, serve (with SIGINT), and
the serving path staying free of torch."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samtriton import server
from samtriton.client import SamClient, ServerUnavailableError
from samtriton.sample_image import sample_scene
from samtriton.serving.postprocessing import decode_rle
from tests.conftest import SAMTRITON, random_boxes

pytestmark = pytest.mark.integration


def _run(args, timeout=600):
    return subprocess.run([*SAMTRITON, *args], capture_output=True, text=True, timeout=timeout)


def test_build_with_random_weights_says_so_loudly(tmp_path):
    out = tmp_path / "repo"
    proc = _run(["build", "--model", "mobilesam", "--random-weights", "--seed", "3", "--out", str(out)], timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("RANDOM WEIGHTS") >= 2  # before and after the build output
    text = (out / "mobilesam_image_encoder" / "config.pbtxt").read_text()
    assert "RANDOM WEIGHTS (seed 3)" in text and 'string_value: "true"' in text
    for name in ("mobilesam_preprocess", "mobilesam_image_embedding", "mobilesam_image_encoder", "mobilesam_mask_decoder", "postprocess",
                 "sam_everything", "sam_everything_mobilesam"):
        assert (out / name / "1" / "model.py").exists()
    assert (out / "mobilesam_image_encoder" / "1" / "model.onnx").stat().st_size > 1_000_000
    for ensemble in ("sam", "sam_encode", "sam_mobilesam", "sam_encode_mobilesam"):
        assert [p.name for p in (out / ensemble / "1").iterdir()] == [".gitkeep"]
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "sam", "sam_encode", "sam_mobilesam", "sam_encode_mobilesam", "mobilesam_preprocess",
        "mobilesam_image_embedding", "mobilesam_image_encoder", "mobilesam_mask_decoder", "postprocess", "sam_everything",
        "sam_everything_mobilesam"])


def test_build_rejects_unknown_model_and_bad_checkpoint(tmp_path):
    proc = _run(["build", "--model", "sam-vit-q", "--random-weights", "--out", str(tmp_path / "x")])
    assert proc.returncode == 2 and "valid models: mobilesam, efficientvit-sam-l0" in proc.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    proc = _run(["build", "--checkpoint", str(bad), "--out", str(tmp_path / "y")])
    assert proc.returncode == 1 and "cannot read checkpoint" in proc.stderr
    assert not (tmp_path / "y").exists()  # nothing half-written
    proc = _run(["build", "--model", "mobilesam", "sam-vit-b", "--checkpoint", str(bad), "--out", str(tmp_path / "z")])
    assert proc.returncode == 2 and "1 values for 2 models" in proc.stderr
    proc = _run(["build", "--model", "mobilesam", "--default", "sam-vit-b", "--random-weights",
                 "--out", str(tmp_path / "w")])
    assert proc.returncode == 1 and "default model 'sam-vit-b' is not among the models built" in proc.stderr


def test_models_lists_the_zoo():
    proc = _run(["models"])
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert list(rows) == ["mobilesam", "efficientvit-sam-l0", "efficientvit-sam-l1", "efficientvit-sam-l2",
                          "efficientvit-sam-xl0", "efficientvit-sam-xl1", "sam-vit-b"]
    assert "512x512" in rows["efficientvit-sam-l0"] and "34.8M" in rows["efficientvit-sam-l0"]
    assert "efficientvit_sam_l0.pt" in rows["efficientvit-sam-l0"]
    assert "1024x1024" in rows["efficientvit-sam-xl1"] and "203.3M" in rows["efficientvit-sam-xl1"]
    assert "sam_vit_b_01ec64.pth" in rows["sam-vit-b"] and "sam_vit_b" in rows["sam-vit-b"]
    assert "(default: also `sam`)" in rows["mobilesam"]


def test_segment_with_model_picks_the_variant(triton_server, tmp_path):
    scene, boxes = sample_scene(320, 240, seed=8)
    image = tmp_path / "scene.png"
    scene.save(image)
    out_json = tmp_path / "l0.json"
    box_args = [arg for b in boxes[:2] for arg in ("--box", ",".join(f"{v:.1f}" for v in b))]
    proc = _run(["segment", str(image), *box_args, "--url", triton_server.grpc_url,
                 "--model", "efficientvit-sam-l0", "--json", str(out_json)])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out_json.read_text())
    with SamClient(triton_server.grpc_url, model="efficientvit-sam-l0") as client:
        direct = client.segment(str(image), np.round(boxes[:2], 1))
    assert [round(m["score"], 5) for m in doc["masks"]] == [round(float(s), 5) for s in direct.scores]
    proc = _run(["segment", str(image), *box_args, "--url", triton_server.grpc_url, "--model", "sam-vit-z"])
    assert proc.returncode == 2 and "valid models:" in proc.stderr


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_segment_prints_masks_and_writes_overlay_and_json(triton_server, tmp_path, protocol):
    scene, boxes = sample_scene(500, 360, seed=6)
    image = tmp_path / "scene.jpg"
    scene.save(image, quality=90)
    box_args = [arg for b in boxes[:3] for arg in ("--box", ",".join(f"{v:.1f}" for v in b))]
    overlay, out_json = tmp_path / "overlay.png", tmp_path / "masks.json"
    proc = _run(["segment", str(image), *box_args, "--url", triton_server.url(protocol), "--protocol", protocol,
                 "--overlay", str(overlay), "--json", str(out_json)])
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("mask ")]
    assert len(lines) == 3 and "score=" in lines[0] and "area=" in lines[0]

    assert Image.open(overlay).size == (500, 360)
    doc = json.loads(out_json.read_text())
    assert (doc["width"], doc["height"]) == (500, 360) and len(doc["masks"]) == 3
    masks = decode_rle([json.dumps(m["segmentation"]) for m in doc["masks"]])
    with SamClient(triton_server.grpc_url) as client:
        direct = client.segment(str(image), np.round(boxes[:3], 1))
    assert np.array_equal(masks, direct.masks)
    assert [m["area"] for m in doc["masks"]] == direct.areas.tolist()


def test_segment_with_clicks_multimask_and_refinement(triton_server, tmp_path):
    """--point clicks (foreground, background), --multimask, --save-logits then
    --mask-input: the same answers as the SDK gives."""
    scene, _ = sample_scene(400, 300, seed=10)
    image = tmp_path / "scene.png"
    scene.save(image)
    out_json, logits, overlay = tmp_path / "clicks.json", tmp_path / "prev.npy", tmp_path / "clicks.png"
    clicks = ["--point", "120,80", "--point", "300,90,0"]
    proc = _run(["segment", str(image), *clicks, "--multimask", "--url", triton_server.grpc_url,
                 "--json", str(out_json), "--save-logits", str(logits), "--overlay", str(overlay)])
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("mask ")]
    assert len(lines) == 1 and lines[0].count("px)") == 3 and "points=120,80+ 300,90-" in lines[0]
    doc = json.loads(out_json.read_text())
    (entry,) = doc["masks"]
    assert doc["multimask"] and entry["points"] == [[120, 80], [300, 90]] and entry["point_labels"] == [1, 0]
    with SamClient(triton_server.grpc_url) as client:
        direct = client.segment(str(image), points=[[120, 80], [300, 90]], point_labels=[1, 0], multimask=True,
                                return_low_res_logits=True)
        refined = client.segment(str(image), points=[[120, 80]], mask_input=direct.low_res_logits[:, 0])
    assert [round(c["score"], 5) for c in entry["candidates"]] == [round(float(v), 5) for v in direct.scores[0]]
    assert np.array_equal(decode_rle([json.dumps(c["segmentation"]) for c in entry["candidates"]]), direct.masks[0])
    saved = np.load(logits)
    assert saved.shape == (1, 3, 256, 256) and np.allclose(saved, direct.low_res_logits, atol=1e-5)
    assert Image.open(overlay).size == (400, 300)

    np.save(logits, saved[:, 0])
    proc = _run(["segment", str(image), "--point", "120,80", "--mask-input", str(logits),
                 "--url", triton_server.grpc_url])
    assert proc.returncode == 0, proc.stderr
    score = float(proc.stdout.split("score=")[1].split()[0])
    assert abs(score - float(refined.scores[0])) < 1e-4

    help_text = _run(["segment", "--help"]).stdout
    for flag in ("--point", "--multimask", "--mask-input", "--save-logits", "x,y[,label]"):
        assert flag in help_text
    for bad, message in ((["--point", "1,2,7"], "label must be 1"), (["--point", "1"], "expected x,y"),
                         (["--box", "0,0,5,5", "--box", "1,1,6,6", "--point", "2,2"], "ambiguous"), ([], "at least one")):
        proc = _run(["segment", str(image), *bad, "--url", triton_server.grpc_url])
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_everything_command_writes_upstream_records(triton_server, tmp_path):
    scene, _ = sample_scene(320, 240, seed=8)
    image = tmp_path / "scene.png"
    scene.save(image)
    out_json, overlay = tmp_path / "everything.json", tmp_path / "everything.png"
    proc = _run(["everything", str(image), "--points-per-side", "3", "--pred-iou-thresh", "0",
                 "--stability-score-thresh", "0", "--box-nms-thresh", "1", "--url", triton_server.grpc_url,
                 "--json", str(out_json), "--overlay", str(overlay)])
    assert proc.returncode == 0, proc.stderr
    records = json.loads(out_json.read_text())["masks"]
    assert len(records) == 27 == proc.stdout.count("mask ") + 7  # 20 printed, "... 7 more"
    assert set(records[0]) >= {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
                               "crop_box"}
    assert Image.open(overlay).size == (320, 240)
    help_text = _run(["everything", "--help"]).stdout
    for flag in ("--points-per-side", "--pred-iou-thresh", "--crop-n-layers", "--min-mask-region-area", "--box"):
        assert flag in help_text
    proc = _run(["everything", str(image), "--points-per-side", "0", "--url", triton_server.grpc_url])
    assert proc.returncode == 1 and "parameters.points_per_side" in proc.stderr, proc.stderr


def test_segment_reports_unreachable_server(tmp_path):
    scene, boxes = sample_scene(64, 48)
    scene.save(tmp_path / "s.png")
    (port,) = server.free_ports(1)
    proc = _run(["segment", str(tmp_path / "s.png"), "--box", "1,1,20,20", "--url", f"127.0.0.1:{port}"])
    assert proc.returncode == 1 and "ServerUnavailableError" in proc.stderr


def test_serve_sigint_finishes_in_flight_request_then_exits(built_repository, tmp_path):
    repo, _ = built_repository
    http, grpc, metrics = server.free_ports(3)
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [*SAMTRITON, "serve", "--model-repository", str(repo), "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        stdout=log, stderr=log,
    )
    try:
        server.wait_ready(proc, http)
        scene, _ = sample_scene(640, 480, seed=8)
        boxes = random_boxes(np.random.default_rng(0), 47, 640, 480)  # several seconds on CPU
        with SamClient(f"127.0.0.1:{grpc}") as client:
            # A finished sam_encode request must not look in flight to the drain.
            client.encode(np.asarray(sample_scene(64, 48, seed=9)[0]), return_embeddings=True)
        outcome = {}

        def slow_request():
            try:
                with SamClient(f"127.0.0.1:{grpc}") as client:
                    outcome["result"] = client.segment(np.asarray(scene), boxes)
            except Exception as e:  # noqa: BLE001 - recorded for the assertion below
                outcome["error"] = e

        worker = threading.Thread(target=slow_request)
        worker.start()
        time.sleep(1.5)  # the encoder is busy with it now
        proc.send_signal(signal.SIGINT)
        worker.join(120)
        assert "error" not in outcome, outcome.get("error")
        assert len(outcome["result"]) == 47

        started = time.monotonic()
        assert proc.wait(timeout=server.EXIT_TIMEOUT_S + 30) == 0
        exit_s = time.monotonic() - started
        print(f"\nexited {exit_s:.1f} s after the in-flight request finished")
        assert exit_s < server.EXIT_TIMEOUT_S / 2  # drained, not timed out
        # Gone: a new request is refused.
        with pytest.raises(ServerUnavailableError):
            with SamClient(f"127.0.0.1:{grpc}", timeout_s=20) as client:
                client.segment(np.asarray(scene), boxes[:1])
        assert b"refusing new requests, finishing those in flight" in (tmp_path / "serve.log").read_bytes()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def test_serving_path_never_loads_torch(triton_server):
    code = (
        "import sys, samtriton.client, samtriton.serving.preprocessing, samtriton.serving.postprocessing, "
        "samtriton.serving.onnx_runtime, samtriton.serving.request_parameters, samtriton.serving.prompts, "
        "samtriton.serving.decoder_batch, samtriton.spec, samtriton.server, "
        "samtriton.client.overlay; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    # And inside the running server: no python stub has libtorch mapped.
    stubs = _children(triton_server.proc.pid)
    assert len(stubs) >= 4, "expected one python stub per model instance"
    maps = {pid: Path(f"/proc/{pid}/maps").read_text() for pid in stubs}
    # The encoder and decoder stubs run ONNX Runtime: proof that these maps show what a stub loaded.
    assert sum("onnxruntime" in m for m in maps.values()) >= 2
    for pid, m in maps.items():
        assert "libtorch" not in m, f"stub {pid} loaded torch"


def test_demo_segments_boxes_then_runs_a_click_session(built_repository, tmp_path):
    repo, _ = built_repository
    overlay = tmp_path / "demo_overlay.png"
    proc = _run(["demo", "--model-repository", str(repo), "--overlay", str(overlay)], timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RANDOM WEIGHTS" not in proc.stderr  # the test repository is built from checkpoint files
    assert proc.stdout.count("\nmask ") + proc.stdout.startswith("mask ") == 6
    clicks = [line for line in proc.stdout.splitlines() if line.startswith(("  encode", "  click"))]
    assert len(clicks) == 4 and all(line.rstrip().split()[-1].startswith("area=") for line in clicks[1:])
    assert "segment everything (points_per_side=8): 0 masks" in proc.stdout  # upstream's thresholds
    for name in ("demo_overlay.png", "demo_overlay_clicks.png", "demo_overlay_everything.png", "demo_input.jpg",
                 "demo_input.png"):
        assert Image.open(tmp_path / name).size == (800, 533)
