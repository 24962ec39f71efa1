"""Smoke runs of the perf harness (the real perf_analyzer and the real locust, a few
seconds each) so that it cannot rot."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
LOCUST = ROOT / ".venv-load" / "bin" / "locust"


def test_perf_analyzer_sweep_smoke(triton_server, tmp_path):
    sys.path.insert(0, str(ROOT / "perf"))
    import sweep

    code = sweep.main([
        "--grpc-url", triton_server.grpc_url, "--http-url", triton_server.http_url,
        "--models", "sam,efficientvit_l0_mask_decoder", "--concurrency", "1,2", "--request-rates", "2",
        "--images", "2", "--max-boxes", "3", "--measurement-requests", "3", "--out-dir", str(tmp_path),
        # A smoke run on 2 shared cores: it checks the harness, not the figures, so any
        # spread between perf_analyzer's windows is accepted (it failed once at 50 %).
        "--stability-percentage", "1000", "--max-trials", "10",
    ])
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert code == 0, rows
    assert {(r["model"], r["protocol"], r["mode"]) for r in rows} == {
        (m, p, mode)
        for m in ("sam", "efficientvit_l0_mask_decoder")
        for p in ("grpc", "http")
        for mode in ("concurrency", "request_rate")
    }
    assert all(float(r["throughput_per_s"]) > 0 and float(r["p95_ms"]) > 0 for r in rows)
    assert "cores" in rows[0]["machine"]
    assert (tmp_path / "sweep_sam.png").stat().st_size > 10_000


@pytest.mark.skipif(not LOCUST.exists(), reason="the load venv is made by `make setup` (make load-setup)")
@pytest.mark.parametrize("bound_ms,expected_exit", [(600_000, 0), (1, 1)])
def test_locust_smoke_and_its_p95_gate(triton_server, tmp_path, bound_ms, expected_exit):
    proc = subprocess.run(
        [str(LOCUST), "-f", str(ROOT / "perf" / "locustfile.py"), "--headless", "-u", "4", "-r", "4", "-t", "8s",
         "--host", triton_server.grpc_url, "--csv", str(tmp_path / "locust"), "--only-summary",
         "--p95-bound-ms", str(bound_ms), "--new-image-boxes", "2"],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == expected_exit, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("samtriton load:")]
    assert summary and "0 unexpected errors" in summary[0], summary
    rows = {r["Name"]: r for r in csv.DictReader(open(tmp_path / "locust_stats.csv"))}
    assert int(rows["Aggregated"]["Request Count"]) > 0
    assert int(rows["Aggregated"]["Failure Count"]) == 0


def test_critical_path_from_tritons_trace(default_runtime_repository, tmp_path):
    """perf/critical_path.py on a real server's trace: only the requests sent while
    the trace is on, each cut into its steps' stretches, which add up to its total."""
    import statistics

    sys.path.insert(0, str(ROOT / "perf"))
    from critical_path import critical_path, critical_paths, traced, tracing_args

    from samtriton import server, spec
    from samtriton.client import SamClient
    from samtriton.sample_image import sample_scene
    from tests.conftest import encode

    scene, boxes = sample_scene(400, 300, seed=31)
    image = encode(scene, "JPEG")
    trace_file = tmp_path / "trace.json"
    ports = server.free_ports(3)
    with open(tmp_path / "tritonserver.log", "wb") as log:
        proc = server.start(server.ServerOptions(default_runtime_repository[0], *ports,
                                                 extra_args=tracing_args(trace_file)), stdout=log, stderr=log)
    try:
        server.wait_ready(proc, ports[0])
        url = f"127.0.0.1:{ports[1]}"
        with SamClient(url) as client:
            client.segment(image, boxes[:1])  # before the trace is on
            with traced(url):
                client.segment(image, boxes[:1])
                client.segment(image, boxes[:2])
            client.segment(image, boxes[:3])  # after it is off again
    finally:
        server.stop(proc)
    names = spec.default_names("mobilesam")
    paths = critical_paths(trace_file, spec.ENSEMBLE)
    assert len(paths) == 2
    steps = (names.preprocess, names.image_embedding, names.mask_decoder, names.postprocess)
    for path in paths:
        labels = [label for label, _ in path]
        assert labels[0] == "before the first step" and labels[-1] == "total"
        assert [label.split(":")[0] for label in labels[1:-1:4]] == list(steps)
        assert f"{names.image_embedding}: until {names.mask_decoder} starts" in labels
        assert sum(ms for _, ms in path[:-1]) == pytest.approx(path[-1][1], abs=1e-6)
        stretch = dict(path)
        assert all(stretch[f"{step}: compute infer"] > 0 for step in steps)
    medians = critical_path(trace_file, spec.ENSEMBLE)
    assert min(p[-1][1] for p in paths) <= dict(medians)["total"] <= max(p[-1][1] for p in paths)
    assert medians == [(label, statistics.median(p[k][1] for p in paths)) for k, (label, _) in enumerate(paths[0])]
    assert critical_path(trace_file, spec.ENSEMBLE, last=1) == paths[-1]
