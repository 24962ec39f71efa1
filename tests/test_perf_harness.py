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
