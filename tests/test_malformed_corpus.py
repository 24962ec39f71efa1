"""A generated corpus of malformed and unusual requests, over gRPC and HTTP, with
good requests in flight beside them (Triton's qa/L0_input_validation in spirit).

Every entry has one right outcome: INVALID_ARG whose message names the field,
or, for images that are unusual but valid (16-bit, CMYK, palette with
transparency, every EXIF orientation), masks equal to the in-process pipeline's.
Corrupted-but-decodable JPEGs may go either way, but if they are served their
masks must equal the in-process result for the same bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from samtriton import server
from samtriton.client import SamClient
from samtriton.client.errors import InvalidInputError, from_triton
from samtriton.sample_image import sample_scene
from samtriton.serving.pipeline import InProcessPipeline
from tests.conftest import encode, mask_iou

pytestmark = pytest.mark.integration

SCENE, _ = sample_scene(320, 240, seed=21)
JPEG = encode(SCENE, "JPEG", quality=90)
PNG = encode(SCENE, "PNG")
WEBP = encode(SCENE, "WEBP", quality=80)
BOX = np.array([[20, 20, 200, 180]], np.float32)


@dataclass
class Entry:
    category: str
    image: bytes | np.ndarray
    boxes: np.ndarray
    box_dtype: str = "FP32"
    parameters: dict | None = None
    expect: str = "invalid"  # "invalid" (field below), "served", or "either"
    field: str = "image"


def _png_header_bomb(w: int, h: int) -> bytes:
    """A valid PNG signature and IHDR claiming w x h pixels, then a tiny IDAT."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(SCENE, "JPEG", quality=90, exif=exif.tobytes())


def _corpus() -> list[Entry]:
    rng = np.random.default_rng(0)
    c: list[Entry] = []
    # Not images at all, and formats that are not accepted.
    for n in (1, 2, 7, 64, 1000, 50_000):
        c.append(Entry("not-image", rng.integers(0, 256, n, dtype=np.uint8).tobytes(), BOX))
    c += [Entry("not-image", b, BOX) for b in (b"", b"<html></html>", b"%PDF-1.7\n", b"\xff\xd8\xff", b"\x89PNG\r\n")]
    for fmt in ("GIF", "BMP", "TIFF", "PPM", "ICO"):
        c.append(Entry("format-refused", encode(SCENE.resize((64, 48)), fmt), BOX))
    # Truncated files at many cut points.
    for data in (JPEG, PNG, WEBP):
        for frac in (0.02, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.97):
            c.append(Entry("truncated", data[: int(len(data) * frac)], BOX))
    # Corrupted bytes inside the entropy-coded data: decodable or not.
    for i in range(10):
        data = bytearray(JPEG)
        for pos in rng.integers(len(data) // 3, len(data) - 10, 8):
            data[pos] = rng.integers(0, 256)
        c.append(Entry("corrupt-jpeg", bytes(data), BOX, expect="either"))
    for i in range(4):
        data = bytearray(PNG)
        data[len(data) // 2 + i * 97] ^= 0xFF  # breaks a CRC or the zlib stream
        c.append(Entry("corrupt-png", bytes(data), BOX))
    # Decompression bombs and huge dimensions (header only).
    for w, h in ((20_000, 20_000), (100_000, 500), (65_535, 65_535), (8000, 6000)):
        c.append(Entry("pixel-bomb", _png_header_bomb(w, h), BOX))
    # Unusual but valid images: these must be served, and correctly.
    gray16 = Image.fromarray((np.asarray(SCENE.convert("L"), np.uint16) * 257))
    palette = SCENE.convert("P", palette=Image.ADAPTIVE, colors=64)
    palette.info["transparency"] = 3
    la = SCENE.convert("LA")
    c += [
        Entry("valid-unusual", encode(gray16, "PNG"), BOX, expect="served"),
        Entry("valid-unusual", encode(SCENE.convert("CMYK"), "JPEG", quality=90), BOX, expect="served"),
        Entry("valid-unusual", encode(palette, "PNG", transparency=3), BOX, expect="served"),
        Entry("valid-unusual", encode(la, "PNG"), BOX, expect="served"),
        Entry("valid-unusual", encode(SCENE.convert("L"), "JPEG", quality=90), BOX, expect="served"),
        Entry("valid-unusual", encode(SCENE.convert("RGBA"), "WEBP", lossless=True), BOX, expect="served"),
    ]
    c += [Entry("exif-orientation", _exif_jpeg(o), BOX, expect="served") for o in range(1, 9)]
    # Box tensors of the wrong dtype or shape (Triton's own checks, or ours).
    for dtype, arr in (("FP64", BOX.astype(np.float64)), ("INT32", BOX.astype(np.int32)),
                       ("FP16", BOX.astype(np.float16)), ("INT64", BOX.astype(np.int64)),
                       ("UINT8", BOX.astype(np.uint8))):
        c.append(Entry("boxes-dtype", JPEG, arr, box_dtype=dtype, field="boxes"))
    for shape in ((4,), (1, 5), (1, 3), (2, 2, 4), (1, 4, 1)):
        c.append(Entry("boxes-shape", JPEG, np.zeros(shape, np.float32), field="boxes"))
    # Box values.
    for col in range(4):
        for bad in (np.nan, np.inf, -np.inf):
            b = np.array([[10, 10, 100, 100], [20, 20, 80, 90]], np.float32)
            b[1, col] = bad
            c.append(Entry("boxes-nonfinite", JPEG, b, field="boxes"))
    for b in ([[100, 10, 50, 60]], [[10, 100, 50, 60]], [[300, 200, 10, 10]]):
        c.append(Entry("boxes-inverted", JPEG, np.array(b, np.float32), field="boxes"))
    for b in ([[330, 10, 400, 50]], [[10, 250, 50, 300]], [[-50, 10, -1, 50]], [[10, -60, 50, -2]],
              [[-90, -90, -10, -5]], [[1e9, 1e9, 2e9, 2e9]]):
        c.append(Entry("boxes-out-of-frame", JPEG, np.array(b, np.float32), field="boxes"))
    c.append(Entry("boxes-count", JPEG, np.zeros((0, 4), np.float32), field="boxes"))
    for n in (257, 400, 1000):
        c.append(Entry("boxes-count", JPEG, np.tile(BOX, (n, 1)), field="boxes"))
    # Partly outside the frame is kept as upstream does: served.
    c.append(Entry("boxes-partly-outside", JPEG, np.array([[-20, -20, 100, 100]], np.float32), expect="served"))
    # Request parameters.
    for value in ("logits", "scores,,", "MASKS", "scores,logits"):
        c.append(Entry("parameters", JPEG, BOX, parameters={"outputs": value}, field="parameters.outputs"))
    return c


CORPUS = _corpus()


def _module(protocol):
    if protocol == "grpc":
        import tritonclient.grpc as m
    else:
        import tritonclient.http as m
    return m


def _send(url: str, protocol: str, e: Entry):
    m = _module(protocol)
    client = m.InferenceServerClient(url)
    try:
        image = m.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([e.image], dtype=np.object_))
        boxes = m.InferInput("boxes", list(e.boxes.shape), e.box_dtype)
        boxes.set_data_from_numpy(e.boxes)
        outputs = [m.InferRequestedOutput("scores"), m.InferRequestedOutput("masks_rle")]
        params = e.parameters or {"outputs": "scores,masks_rle"}
        if protocol == "http":
            return client.infer("sam", [image, boxes], outputs=outputs, parameters=params)
        return client.infer("sam", [image, boxes], outputs=outputs, parameters=params, client_timeout=300)
    finally:
        client.close()


def test_malformed_corpus(triton_server, built_repository):
    assert len(CORPUS) * 2 >= 200
    repo, _ = built_repository
    pipeline = InProcessPipeline(repo)
    good_scene, _ = sample_scene(300, 200, seed=22)
    good = (encode(good_scene, "PNG"), np.array([[10, 10, 150, 120]], np.float32))
    good_ref = pipeline.segment(*good)

    jobs = [(p, e) for e in CORPUS for p in ("grpc", "http")]
    outcomes: Counter = Counter()
    problems: list[str] = []

    def run(job):
        protocol, e = job
        try:
            result = _send(triton_server.url(protocol), protocol, e)
        except Exception as exc:  # tritonclient's InferenceServerException
            err = from_triton(exc)
            ok = isinstance(err, InvalidInputError) and e.expect in ("invalid", "either") and e.field in str(err)
            return protocol, e, "INVALID_ARG" if isinstance(err, InvalidInputError) else type(err).__name__, ok, str(err)
        if e.expect == "invalid":
            return protocol, e, "served", False, "served although invalid"
        from samtriton.serving.postprocessing import decode_rle

        masks = decode_rle([bytes(r) for r in result.as_numpy("masks_rle")])
        try:
            ref_masks, ref_scores = pipeline.segment(e.image, e.boxes)
        except Exception as ref_exc:
            return protocol, e, "served", False, f"served, but in-process it fails: {ref_exc}"
        same = (masks.shape == ref_masks.shape and mask_iou(masks, ref_masks).min() >= 0.99
                and np.allclose(result.as_numpy("scores"), ref_scores, atol=1e-4))
        return protocol, e, "served", same, "" if same else "served masks differ from the in-process pipeline"

    def good_request(_):
        with SamClient(triton_server.grpc_url) as client:
            r = client.segment(*good)
        return np.array_equal(r.masks, good_ref[0])

    with ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(good_request, i) for i in range(12)]
        for protocol, e, outcome, ok, message in pool.map(run, jobs):
            outcomes[(e.category, outcome)] += 1
            if not ok:
                problems.append(f"{protocol} {e.category} ({e.expect}, field {e.field}): {outcome}: {message[:160]}")
        good_ok = [g.result() for g in goods]

    print(f"\n{len(jobs)} corpus requests ({len(CORPUS)} entries x gRPC/HTTP), 12 good ones beside them:")
    for (category, outcome), n in sorted(outcomes.items()):
        print(f"  {category:<22} {outcome:<12} {n}")
    assert not problems, "\n".join(problems[:20])
    assert all(good_ok), "a good request in flight with the corpus failed or changed"
    assert server.is_ready(triton_server.http_port)
