"""Start a server, run the locust load test (perf/locustfile.py) headless against it, stop it.

    .venv/bin/python perf/run_load.py --model-repository var/model_repository \\
        --locust .venv-load/bin/locust --users 16 --run-time 2m --p95-bound-ms 60000

Writes perf/results/locust_stats.csv (and locust's other CSVs) and exits with
locust's exit code: non-zero on an unexpected error or a p95 above the bound.
To load an existing server, run locust directly (see perf/locustfile.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samtriton import server  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", default="var/model_repository")
    parser.add_argument("--locust", default=".venv-load/bin/locust")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--spawn-rate", type=float, default=4)
    parser.add_argument("--run-time", default="2m")
    parser.add_argument("--p95-bound-ms", type=float, default=60000)
    parser.add_argument("--csv-prefix", default=str(HERE / "results" / "locust"))
    args = parser.parse_args(argv)

    Path(args.csv_prefix).parent.mkdir(parents=True, exist_ok=True)
    http, grpc, metrics = server.free_ports(3)
    proc = server.start(server.ServerOptions(Path(args.model_repository), http, grpc, metrics),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server.wait_ready(proc, http)
        return subprocess.run([
            args.locust, "-f", str(HERE / "locustfile.py"), "--headless",
            "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time,
            "--host", f"127.0.0.1:{grpc}", "--csv", args.csv_prefix, "--only-summary",
            "--p95-bound-ms", str(args.p95_bound_ms),
        ]).returncode
    finally:
        server.stop(proc)


if __name__ == "__main__":
    sys.exit(main())
