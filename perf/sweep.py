"""perf_analyzer sweeps of the served models, over gRPC and HTTP, with CSV and plots.

    .venv/bin/python perf/sweep.py --model-repository var/model_repository     # starts its own server
    .venv/bin/python perf/sweep.py --grpc-url host:8001 --http-url host:8000   # an existing server

For each model (`sam` with real images and box sets from perf/pa_inputs.py;
a variant's `<slug>_image_encoder` and `<slug>_mask_decoder` alone with zero tensors) and protocol, it
runs the real perf_analyzer (the one tritonclient 2.51 ships) over the
concurrency range, and over request rates if given, with `--percentile=95` and
`-f` CSV; then writes perf/results/sweep.csv (machine named in every row) and
one PNG per model: throughput and p95 latency against concurrency.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import machine  # noqa: E402
from pa_inputs import decoder_requests, sam_requests  # noqa: E402

from samtriton import server, spec  # noqa: E402
from samtriton.serving.request_parameters import ALL_OUTPUTS, OUTPUTS_PARAMETER  # noqa: E402
from samtriton.variants import DEFAULT_MODEL, get_variant  # noqa: E402

RESULTS = Path(__file__).parent / "results"


class PerfAnalyzerMissing(RuntimeError):
    pass


def perf_analyzer() -> tuple[Path, dict[str, str]]:
    """The perf_analyzer of the tritonclient wheel, with the libraries it needs."""
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.exists():
        raise PerfAnalyzerMissing("perf_analyzer not found: install tritonclient[all]==2.51.0 (make setup)")
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime  # libcudart.so.12: perf_analyzer links it even on CPU

        cudart = Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(cudart), env.get("LD_LIBRARY_PATH", "")) if p)
    except ImportError:
        pass
    probe = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        raise PerfAnalyzerMissing(
            "perf_analyzer does not start: " + (probe.stderr.strip() or probe.stdout.strip())
            + "\n(it needs libb64.so.0d: `apt-get install libb64-0d`, and libcudart.so.12: "
            "`pip install nvidia-cuda-runtime-cu12`; `make setup` does both)"
        )
    return binary, env


SAM_OUTPUTS = f"{spec.SCORES.name},{spec.MASKS_RLE.name}"


def sam_outputs(model: str, protocol: str) -> str:
    """What the server computes per `sam` request in this sweep.  perf_analyzer
    2.51 sends request parameters over gRPC only, so over HTTP the `outputs`
    parameter is missing and the server computes every output (dense masks too)."""
    if spec.role_of(model) != spec.ENSEMBLE:
        return "-"
    return SAM_OUTPUTS if protocol == "grpc" else "all (" + ",".join(ALL_OUTPUTS) + ")"


DECODER_INPUTS = "pa_decoder_inputs.json"  # beside the ensemble's inputs_json


def model_args(model: str, protocol: str, inputs_json: Path) -> list[str]:
    role = spec.role_of(model)
    if role == spec.ENSEMBLE:
        params = ["--request-parameter", f"{OUTPUTS_PARAMETER}:{SAM_OUTPUTS}:string"] if protocol == "grpc" else []
        return ["--input-data", str(inputs_json), *params]
    if role == spec.IMAGE_ENCODER:
        return ["--input-data", "zero", "-b", "1"]  # "random" FP32 bytes include NaN/inf
    if role == spec.MASK_DECODER:
        return ["--input-data", str(inputs_json.with_name(DECODER_INPUTS)), "-b", "1"]  # pa_inputs.decoder_requests
    raise ValueError(f"no perf_analyzer settings for model {model!r}")


def run_one(binary, env, model, protocol, url, mode, levels, inputs_json, args, workdir) -> list[dict]:
    out_csv = workdir / f"{model}-{protocol}-{mode}.csv"
    level_flag = "--concurrency-range" if mode == "concurrency" else "--request-rate-range"
    rows = []
    for level in levels:  # one perf_analyzer run per level: a failure costs one point, not the sweep
        cmd = [
            str(binary), "-m", model, "-u", url, "-i", protocol,
            level_flag, f"{level}:{level}",
            "--percentile=95", "-f", str(out_csv),
            # A window must hold more requests than are in flight, or its p95 is one batch's timing
            # and three windows rarely agree (perf_analyzer then reports no stable measurement).
            "--measurement-mode", "count_windows", "--measurement-request-count",
            str(max(args.measurement_requests, 2 * int(level)) if mode == "concurrency" else args.measurement_requests),
            "-s", str(args.stability_percentage), "-r", str(args.max_trials),
            *model_args(model, protocol, inputs_json),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s)
        if proc.returncode != 0 or not out_csv.exists():
            print(f"  {model} {protocol} {mode}={level}: perf_analyzer failed (exit {proc.returncode}):\n"
                  f"{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
            rows.append({"model": model, "protocol": protocol, "mode": mode, "level": level, "ok": False,
                         "outputs": sam_outputs(model, protocol)})
            continue
        with open(out_csv) as f:
            record = next(csv.DictReader(f))
        row = {
            "model": model, "protocol": protocol, "mode": mode, "level": level, "ok": True,
            "outputs": sam_outputs(model, protocol),
            "throughput_per_s": float(record["Inferences/Second"]),
            "p50_ms": float(record["p50 latency"]) / 1000,
            "p95_ms": float(record["p95 latency"]) / 1000,
            "p99_ms": float(record["p99 latency"]) / 1000,
        }
        rows.append(row)
        print(f"  {model:<13} {protocol:<4} {mode}={level:<5} {row['throughput_per_s']:8.2f}/s "
              f"p50 {row['p50_ms']:8.1f} ms  p95 {row['p95_ms']:8.1f} ms")
        out_csv.unlink()
    return rows


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Earlier rows (read back from CSV) with the points measured now replacing theirs."""
    def key(r):
        return r["model"], r["protocol"], r["mode"], float(r["level"])

    def typed(r):
        out = {k: v for k, v in r.items() if k != "machine"}
        out["ok"] = str(out["ok"]) == "True"
        out["level"] = float(out["level"]) if out["mode"] == "request_rate" else int(float(out["level"]))
        for k in ("throughput_per_s", "p50_ms", "p95_ms", "p99_ms"):
            if out.get(k) not in (None, ""):
                out[k] = float(out[k])
        return out

    replaced = {key(r) for r in new}
    merged = [typed(r) for r in old if key(r) not in replaced] + new
    return sorted(merged, key=lambda r: (r["model"], r["protocol"], r["mode"], float(r["level"])))


def plot(rows: list[dict], out_dir: Path, desc: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for model in sorted({r["model"] for r in rows}):
        fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
        for protocol in ("grpc", "http"):
            pts = [r for r in rows if r["model"] == model and r["protocol"] == protocol
                   and r["mode"] == "concurrency" and r["ok"]]
            if not pts:
                continue
            xs = [r["level"] for r in pts]
            label = protocol if pts[0]["outputs"] == "-" else f"{protocol}: {pts[0]['outputs']}"
            ax_t.plot(xs, [r["throughput_per_s"] for r in pts], marker="o", label=label)
            ax_l.plot(xs, [r["p95_ms"] for r in pts], marker="o", label=label)
        for ax, label in ((ax_t, "throughput (requests/s)"), (ax_l, "p95 latency (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.suptitle(f"{model} — {desc}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"sweep_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", default="var/model_repository",
                        help="start a server on this repository (ignored with --grpc-url/--http-url)")
    parser.add_argument("--grpc-url")
    parser.add_argument("--http-url")
    default_steps = spec.default_names(get_variant(DEFAULT_MODEL).slug)
    parser.add_argument("--models", default=f"{spec.ENSEMBLE},{default_steps.image_encoder},{default_steps.mask_decoder}",
                        help="Triton model names: any variant's ensemble (sam_<slug>), encoder or decoder")
    parser.add_argument("--protocols", default="grpc,http")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32")
    parser.add_argument("--request-rates", default="", help="e.g. 0.5,1,2 (requests/s); empty: none")
    parser.add_argument("--images", type=int, default=8, help="distinct images in the sam input data")
    parser.add_argument("--max-boxes", type=int, default=47)
    parser.add_argument("--measurement-requests", type=int, default=12)
    parser.add_argument("--stability-percentage", type=int, default=50)
    parser.add_argument("--max-trials", type=int, default=6)
    parser.add_argument("--timeout-s", type=int, default=900, help="per perf_analyzer run")
    parser.add_argument("--cache-size-mb", type=float, default=0,
                        help="embedding cache (and response cache) of the server this script starts; 0 (default) "
                             "measures every request's encoder work, otherwise repeated images are answered from "
                             "the cache")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an earlier sweep.csv in --out-dir, replacing the points measured now")
    args = parser.parse_args(argv)

    binary, env = perf_analyzer()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = None
    if not (args.grpc_url or args.http_url):
        http, grpc, metrics = server.free_ports(3)
        opts = server.ServerOptions(Path(args.model_repository), http, grpc, metrics,
                                    cache_bytes=int(args.cache_size_mb * 2**20),
                                    embedding_cache_mb=args.cache_size_mb)
        proc = server.start(opts, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server.wait_ready(proc, http)
        args.grpc_url, args.http_url = f"127.0.0.1:{grpc}", f"127.0.0.1:{http}"
    urls = {"grpc": args.grpc_url, "http": args.http_url}
    desc = machine()
    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory(prefix="samtriton-sweep-") as tmp:
            workdir = Path(tmp)
            inputs_json = workdir / "pa_inputs.json"
            inputs_json.write_text(json.dumps(sam_requests(args.images, max_boxes=args.max_boxes)))
            (workdir / DECODER_INPUTS).write_text(json.dumps(decoder_requests()))
            for model in args.models.split(","):
                for protocol in args.protocols.split(","):
                    levels = [int(c) for c in args.concurrency.split(",") if c]
                    rows += run_one(binary, env, model, protocol, urls[protocol], "concurrency", levels,
                                    inputs_json, args, workdir)
                    rates = [float(r) for r in args.request_rates.split(",") if r]
                    if rates:
                        rows += run_one(binary, env, model, protocol, urls[protocol], "request_rate", rates,
                                        inputs_json, args, workdir)
    finally:
        if proc is not None:
            server.stop(proc)

    if args.merge and (out_dir / "sweep.csv").exists():
        rows = merge_rows(list(csv.DictReader(open(out_dir / "sweep.csv"))), rows)
    fields = ["machine", "model", "protocol", "outputs", "mode", "level", "ok", "throughput_per_s", "p50_ms", "p95_ms", "p99_ms"]
    with open(out_dir / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({"machine": desc, **r})
    pngs = plot(rows, out_dir, desc)
    print(f"machine: {desc}\nwrote {out_dir / 'sweep.csv'} and {', '.join(str(p) for p in pngs)}")
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
