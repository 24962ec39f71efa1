"""One image, 47 boxes: one decoder call per box vs one call for all 47.

    .venv/bin/python perf/batched_vs_sequential.py --model-repository var/model_repository

The EfficientViT-SAM seed's experiment (400 ms -> 10 ms on an A100), measured
(a) in-process: the exported ONNX decoder in the runtime and precision the
repository serves it with (ONNX Runtime or OpenVINO), and the upstream
PyTorch prompt encoder + mask decoder for reference; (b) through the served
`sam` ensemble: 47 requests of 1 box one after another, the same 47 requests
all in flight at once (Triton batches them in the decoder), and 1 request of
47 boxes.  The image is encoded once, timed apart; in (b) the encoder answers
from its response cache.  Runs unchanged on a GPU host (ONNX Runtime's CUDA
provider and torch.cuda are used when present).  Writes
perf/results/batched_vs_sequential.csv.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import RESULTS, machine, median_ms  # noqa: E402

from samtriton import server  # noqa: E402
from samtriton.client import AsyncSamClient, SamClient  # noqa: E402
from samtriton.sample_image import sample_scene  # noqa: E402
from samtriton.serving.pipeline import InProcessPipeline, step_runtime  # noqa: E402
from samtriton.serving.prompts import PromptInputs, build_prompts  # noqa: E402

N_BOXES = 47


def torch_decoder_rows(embedding: np.ndarray, model_boxes: np.ndarray, repeats: int) -> list[tuple]:
    """The upstream PyTorch modules (random weights: timing does not depend on them)."""
    try:
        import torch

        from samtriton.build.checkpoint import random_state_dict
        from samtriton.build.registry import DEFAULT_MODEL, build_module, get_variant
    except ImportError:
        return []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variant = get_variant(DEFAULT_MODEL)
    sam = build_module(variant)
    sam.load_state_dict(random_state_dict(variant, 0))
    sam.eval().to(device)
    emb = torch.from_numpy(embedding).to(device)
    boxes = torch.from_numpy(model_boxes).to(device)
    pe = sam.prompt_encoder.get_dense_pe()

    def decode(b):
        with torch.no_grad():
            sparse, dense = sam.prompt_encoder(points=None, boxes=b, masks=None)
            out = sam.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                   dense_prompt_embeddings=dense, multimask_output=False)
            if device == "cuda":
                torch.cuda.synchronize()
            return out

    one_by_one = median_ms(lambda: [decode(boxes[i : i + 1]) for i in range(len(boxes))], repeats)
    batched = median_ms(lambda: decode(boxes), repeats)
    return [(f"in-process PyTorch ({device})", one_by_one, batched)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", default="var/model_repository")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    args = parser.parse_args(argv)
    repo = Path(args.model_repository)

    scene, _ = sample_scene(1024, 683, seed=0)
    buf = io.BytesIO()
    scene.save(buf, format="JPEG", quality=92)
    image = buf.getvalue()
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, [900, 560], size=(N_BOXES, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(30, 120, size=(N_BOXES, 2))], axis=1).astype(np.float32)

    pipe = InProcessPipeline(repo)
    pre = pipe.preprocess(image, PromptInputs(boxes=boxes))
    one_each = [build_prompts(PromptInputs(boxes=boxes[i : i + 1]), pre.geometry) for i in range(N_BOXES)]
    encode_ms = median_ms(lambda: pipe.encode(pre), args.repeats)
    embedding = pipe.encode(pre)
    # The decoder runs in-process as the repository serves it (OpenVINO bf16 by default on CPUs with native bf16).
    label = f"in-process {step_runtime(repo, pipe.names.mask_decoder).label}"
    if hasattr(pipe.decoder, "get_providers"):  # ONNX Runtime: its execution providers (CUDA on a GPU host)
        label += " (" + ",".join(p.replace("ExecutionProvider", "") for p in pipe.decoder.get_providers()) + ")"
    rows = [(
        label,
        median_ms(lambda: [pipe.decode(embedding, prompts) for prompts in one_each], args.repeats),
        median_ms(lambda: pipe.decode(embedding, pre.prompts), args.repeats),
    )]
    if not args.no_torch:  # the box corners in the prompt frame, as xyxy
        rows += torch_decoder_rows(embedding, pre.prompts.coords.reshape(-1, 4), args.repeats)

    http, grpc, metrics = server.free_ports(3)
    proc = server.start(server.ServerOptions(repo, http, grpc, metrics),
                        stdout=open(os.devnull, "wb"), stderr=open(os.devnull, "wb"))
    try:
        server.wait_ready(proc, http)
        url = f"127.0.0.1:{grpc}"
        with SamClient(url) as client:
            client.encode(image)  # the encoder runs once here; afterwards its cache answers

            def sequential():
                for i in range(N_BOXES):
                    client.segment(image, boxes[i : i + 1])

            served_sequential = median_ms(sequential, args.repeats)
            served_batched = median_ms(lambda: client.segment(image, boxes), args.repeats)

        async def concurrent():
            async with AsyncSamClient(url) as aclient:
                await aclient.segment_many([(image, boxes[i : i + 1]) for i in range(N_BOXES)], concurrency=N_BOXES)

        served_concurrent = median_ms(lambda: asyncio.run(concurrent()), args.repeats)
    finally:
        server.stop(proc)
    rows.append(("served sam ensemble (gRPC)", served_sequential, served_batched))

    desc = machine()
    print(f"machine: {desc}\nMobileSAM, 1024x683 JPEG, {N_BOXES} boxes, medians of {args.repeats}")
    print(f"  image encoder (in-process, counted once, apart): {encode_ms:.0f} ms")
    print(f"  {'':<44} {'47 x 1 box':>12} {'1 x 47 boxes':>13} {'ratio':>7}")
    for name, seq, bat in rows:
        print(f"  {name:<44} {seq:10.0f} ms {bat:11.0f} ms {seq / bat:6.2f}x")
    print(f"  served, 47 x 1-box requests all in flight (decoder batches them): {served_concurrent:.0f} ms "
          f"({served_sequential / served_concurrent:.2f}x vs one after another)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "batched_vs_sequential.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["machine", "path", "one_by_one_ms", "batched_ms", "ratio"])
        for name, seq, bat in rows:
            w.writerow([desc, name, f"{seq:.1f}", f"{bat:.1f}", f"{seq / bat:.2f}"])
        w.writerow([desc, "served, 47 concurrent 1-box requests", f"{served_sequential:.1f}",
                    f"{served_concurrent:.1f}", f"{served_sequential / served_concurrent:.2f}"])
        w.writerow([desc, "image encoder once (in-process)", f"{encode_ms:.1f}", "", ""])
    return 0


if __name__ == "__main__":
    sys.exit(main())
