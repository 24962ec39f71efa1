"""Peak resident memory of `samtriton build`, per variant, and the build step it peaks in.

    .venv/bin/python perf/build_memory.py [--model mobilesam efficientvit-sam-l0 sam-vit-b]

Runs `samtriton build --model NAME --random-weights` (the default CPU runtimes,
accuracy gate included) once per variant in a process of its own and samples
the resident memory of it and its children every 0.1 s; the peak is stated
with the build step printing at that moment.  Also the kernel's own figure
(`ru_maxrss` of the child, what `/usr/bin/time -v` reports as "Maximum
resident set size").  Writes perf/results/build_memory.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import RESULTS, machine  # noqa: E402

SAMTRITON = str(Path(sys.executable).parent / "samtriton")


def tree_rss_bytes(pid: int) -> int:
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                todo.extend(int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split())
        except OSError:
            continue
    return total


def measure(model: str, out_dir: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.Popen([SAMTRITON, "build", "--model", model, "--random-weights", "--out", str(out_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    step = {"now": "starting"}
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("["):
                step["now"] = line.split("] ", 1)[-1].strip()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak, peak_step, started = 0, "", time.perf_counter()
    while proc.poll() is None:
        rss = tree_rss_bytes(proc.pid)
        if rss > peak:
            peak, peak_step = rss, step["now"]
        time.sleep(0.1)
    reader.join(timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"samtriton build --model {model} failed:\n{''.join(lines[-30:])}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"model": model, "peak_gb": peak / 1e9, "peak_step": peak_step,
            # ru_maxrss is the largest child so far (KiB): only meaningful when this one set a new maximum.
            "kernel_maxrss_gb": after * 1024 / 1e9 if after > before else None,
            "seconds": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", nargs="+", default=["mobilesam", "efficientvit-sam-l0", "sam-vit-b"])
    args = parser.parse_args()
    desc = machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="samtriton-build-memory-") as tmp:
        # Smallest first: the kernel's figure is the largest child so far.
        for model in args.model:
            row = measure(model, Path(tmp) / model)
            rows.append(row)
            kernel = "" if row["kernel_maxrss_gb"] is None else f" (kernel: {row['kernel_maxrss_gb']:.2f} GB)"
            print(f"{model:<22} peak {row['peak_gb']:.2f} GB{kernel} in {row['seconds']:.0f} s, "
                  f"during: {row['peak_step']}", flush=True)
    print(f"machine: {desc}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "build_memory.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["machine", "model", "peak_gb", "kernel_maxrss_gb", "peak_step", "seconds"])
        for r in rows:
            kernel = "" if r["kernel_maxrss_gb"] is None else f"{r['kernel_maxrss_gb']:.2f}"
            w.writerow([desc, r["model"], f"{r['peak_gb']:.2f}", kernel, r["peak_step"], f"{r['seconds']:.0f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
