"""Where an ensemble request's time goes on its critical path, from Triton's own trace.

Triton's statistics give each step's queue and compute time, but not the
time between steps: a python step that answers through its response sender
from an event loop (`image_embedding` on a miss) has its compute counted as
the hand-off to the loop, and the copies of its response land between the
steps.  One that sends its response from inside `execute()` (`image_embedding`
on a hit) counts the send in its compute infer, and the next step can start
before that ends: "until <next> starts" is then negative, the two stretches
together still exact.  Triton's
trace (level TIMESTAMPS) stamps every step of an ensemble request, so the
request's time can be cut into consecutive stretches: from each step's start
to the next step's start (its queue, compute input and compute infer, then
what passes until the next step starts: its output, its response's copies,
the ensemble's hand-off), and from the last step's start to the ensemble's
end.  The stretches add up to the ensemble's total exactly.

The server is started with `tracing_args(file)` (trace off), the trace is
turned on only around the requests to trace (`traced`), and the file,
written when the server stops, is read with `critical_path`.
"""

from __future__ import annotations

import json
import statistics
from contextlib import contextmanager
from pathlib import Path


def tracing_args(trace_file: Path) -> tuple[str, ...]:
    """tritonserver flags: Triton's trace to `trace_file`, off until `traced` turns it on."""
    return (f"--trace-config=triton,file={trace_file}", "--trace-config=level=OFF", "--trace-config=rate=1",
            "--trace-config=count=-1", "--trace-config=log_frequency=0")


def _set_trace_level(url: str, level: str) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        client.update_trace_settings(settings={"trace_level": [level]})
    finally:
        client.close()


@contextmanager
def traced(url: str):
    """Every request Triton (gRPC at `url`) receives meanwhile is traced."""
    _set_trace_level(url, "TIMESTAMPS")
    try:
        yield
    finally:
        _set_trace_level(url, "OFF")


def _requests(trace_file: Path) -> tuple[dict[int, dict], dict[int, dict[str, int]]]:
    models, stamps = {}, {}
    for entry in json.loads(Path(trace_file).read_text()):
        if "model_name" in entry:
            models[entry["id"]] = entry
        if "timestamps" in entry:
            stamps.setdefault(entry["id"], {}).update({t["name"]: t["ns"] for t in entry["timestamps"]})
    return models, stamps


def critical_paths(trace_file: Path, ensemble: str) -> list[list[tuple[str, float]]]:
    """Each traced request to `ensemble`, in the order they started: its
    stretches (label, ms) in order, the last one its total."""
    models, stamps = _requests(trace_file)
    roots = sorted((i for i, m in models.items() if m["model_name"] == ensemble and not m.get("parent_id")),
                   key=lambda i: stamps[i]["REQUEST_START"])
    children: dict[int, list[int]] = {}
    for i, m in models.items():
        if m.get("parent_id"):
            children.setdefault(m["parent_id"], []).append(i)
    paths = []
    for root in roots:
        steps = sorted(children.get(root, []), key=lambda i: stamps[i]["REQUEST_START"])
        names = [models[i]["model_name"] for i in steps]
        start, end = stamps[root]["REQUEST_START"], stamps[root]["REQUEST_END"]
        stretches = [("before the first step", stamps[steps[0]]["REQUEST_START"] - start)] if steps else []
        for k, (step, name) in enumerate(zip(steps, names)):
            s = stamps[step]
            following = stamps[steps[k + 1]]["REQUEST_START"] if k + 1 < len(steps) else end
            then = f"until {names[k + 1]} starts" if k + 1 < len(steps) else "until the ensemble ends"
            stretches += [
                (f"{name}: queue", s["COMPUTE_START"] - s["REQUEST_START"]),
                (f"{name}: compute input", s["COMPUTE_INPUT_END"] - s["COMPUTE_START"]),
                (f"{name}: compute infer", s["COMPUTE_OUTPUT_START"] - s["COMPUTE_INPUT_END"]),
                (f"{name}: {then}", following - s["COMPUTE_OUTPUT_START"]),
            ]
        stretches.append(("total", end - start))
        paths.append([(label, ns / 1e6) for label, ns in stretches])
    return paths


def critical_path(trace_file: Path, ensemble: str, last: int | None = None) -> list[tuple[str, float]]:
    """Each stretch's median (ms) over the `last` traced requests to `ensemble`
    (all if None), which must all have run the same steps."""
    paths = critical_paths(trace_file, ensemble)[-last if last else None:]
    if not paths:
        raise ValueError(f"{trace_file}: no traced request to {ensemble}")
    labels = [label for label, _ in paths[0]]
    for path in paths:
        if [label for label, _ in path] != labels:
            raise ValueError(f"{trace_file}: requests to {ensemble} ran different steps")
    return [(label, statistics.median(path[k][1] for path in paths)) for k, label in enumerate(labels)]
