"""perf_analyzer `--input-data` JSON with real encoded images and box sets.

    .venv/bin/python perf/pa_inputs.py --out perf/results/pa_inputs.json --images 8

Each entry is one `sam` request: a JPEG or PNG of a generated scene (several
sizes and aspect ratios) and a box set of 1 to 47 boxes.  perf_analyzer cycles
through the entries, so the encoder sees `--images` distinct images and then
repeats (the embedding cache answers repeats unless the server runs without it:
`samtriton serve --embedding-cache-mb 0`).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samtriton import spec  # noqa: E402
from samtriton.sample_image import sample_scene  # noqa: E402

SIZES = [(1024, 683), (640, 480), (480, 640), (1280, 720), (800, 800), (333, 500)]
BOX_COUNTS = [1, 5, 12, 47, 3, 20]


def _boxes(rng, n, w, h):
    x0 = rng.uniform(0, w * 0.8, n)
    y0 = rng.uniform(0, h * 0.8, n)
    x1 = np.minimum(x0 + rng.uniform(8, w * 0.5, n), w)
    y1 = np.minimum(y0 + rng.uniform(8, h * 0.5, n), h)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def bytes_tensor_b64(element: bytes) -> str:
    """A one-element BYTES tensor as perf_analyzer's "b64" wants it: serialized
    the way Triton does (4-byte little-endian length, then the bytes)."""
    return base64.b64encode(struct.pack("<I", len(element)) + element).decode("ascii")


def sam_requests(images: int, seed: int = 0, max_boxes: int = 47) -> dict:
    rng = np.random.default_rng(seed)
    data = []
    for i in range(images):
        w, h = SIZES[i % len(SIZES)]
        scene, _ = sample_scene(w, h, seed=seed + i)
        buf = io.BytesIO()
        scene.save(buf, format="JPEG" if i % 2 == 0 else "PNG", **({"quality": 90} if i % 2 == 0 else {}))
        n = min(BOX_COUNTS[i % len(BOX_COUNTS)], max_boxes)
        boxes = _boxes(rng, n, w, h)
        data.append({
            spec.IMAGE.name: {"b64": bytes_tensor_b64(buf.getvalue())},
            spec.BOXES.name: {"content": [round(float(v), 2) for v in boxes.reshape(-1)], "shape": [n, 4]},
        })
    return {"data": data}


def decoder_requests() -> dict:
    """One zero-filled request to a `<slug>_mask_decoder` alone: 5 prompts of 2 tokens (zero
    labels: background clicks), no mask input (one zero placeholder), the embedding as a
    tensor.  Listed explicitly because `--input-data zero` would also send the CPU target's
    optional `embedding_handle`, and the decoder takes one or the other."""
    shapes = {spec.IMAGE_EMBEDDINGS_NAME: list(spec.EMBEDDING_SHAPE), spec.PROMPT_COORDS_NAME: [5, 2, 2],
              spec.PROMPT_LABELS_NAME: [5, 2], spec.MODEL_MASK_INPUTS_NAME: [1, 256, 256],
              spec.HAS_MASK_INPUT_NAME: [5]}
    # perf_analyzer reads an FP32 tensor's JSON content only as floats (0.0, not 0).
    zero = {name: 0 if name == spec.PROMPT_LABELS_NAME else 0.0 for name in shapes}
    return {"data": [{name: {"content": [zero[name]] * int(np.prod(shape)), "shape": shape}
                      for name, shape in shapes.items()}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="perf/results/pa_inputs.json")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--max-boxes", type=int, default=47)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(sam_requests(args.images, args.seed, args.max_boxes)))
    print(f"wrote {out} ({args.images} requests)")


if __name__ == "__main__":
    main()
