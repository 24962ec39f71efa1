"""Shared fixtures: a random checkpoint in the official layout, a repository built
from it by the real CLI, and a real tritonserver serving it on free ports."""

from __future__ import annotations

import faulthandler
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# The installed console script, as users run it.
SAMTRITON = [str(Path(sys.executable).parent / "samtriton")]
CHECKPOINT_SEED = 0
# The variants the test server holds side by side (mobilesam is the default,
# `sam`); the served-vs-upstream fidelity tests run on each.
SERVED_MODELS = ("mobilesam", "efficientvit-sam-l0", "sam-vit-b")

# pytest-timeout fails a test by raising from its SIGALRM handler. A test stuck where
# that exception is lost (raised inside a __del__, or a C call that never returns to
# Python) would hang on to CI's limit and print nothing; HANG_MARGIN_S past the test's
# timeout every thread's stack goes to the real stderr and pytest exits.
HANG_MARGIN_S = float(os.environ.get("SAMTRITON_TEST_HANG_MARGIN_S", "120"))
_REAL_STDERR = pytest.StashKey[int]()


def pytest_configure(config):
    # Output capture is suspended here; during a test, fd 2 is that test's capture file.
    config.stash[_REAL_STDERR] = os.dup(2)


def pytest_timeout_set_timer(item, settings):
    faulthandler.dump_traceback_later(settings.timeout + HANG_MARGIN_S, exit=True,
                                      file=item.config.stash[_REAL_STDERR])
    # None: pytest-timeout sets its own timer too


def pytest_timeout_cancel_timer(item):
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session")
def random_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random-weight checkpoints in each served variant's official layout and file name."""
    from samtriton.build.checkpoint import write_random_checkpoint
    from samtriton.variants import get_variant

    folder = tmp_path_factory.mktemp("checkpoints")
    return {
        name: write_random_checkpoint(get_variant(name), folder / get_variant(name).checkpoint_file,
                                      seed=CHECKPOINT_SEED)
        for name in SERVED_MODELS
    }


@pytest.fixture(scope="session")
def random_checkpoint(random_checkpoints) -> Path:
    return random_checkpoints["mobilesam"]


# The main test repository runs both steps in the fp32 reference runtime, so
# the exactness tests hold it to 0.99 IoU / 1e-3 scores against upstream; the
# default runtime (OpenVINO bf16) has its own repository and bounds.
REFERENCE_RUNTIME = ["--encoder-runtime", "onnxruntime", "--decoder-runtime", "onnxruntime"]
# The variants of the default-runtime repository.
DEFAULT_RUNTIME_MODELS = ("mobilesam", "efficientvit-sam-l0")


def build(out: Path, models, checkpoints: dict[str, Path], *extra: str) -> str:
    """`samtriton build --model ... --checkpoint NAME=PATH ... --out OUT`; returns its output."""
    args = [f"--checkpoint={name}={checkpoints[name]}" for name in models]
    proc = subprocess.run([*SAMTRITON, "build", "--model", *models, *args, "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def built_repository(tmp_path_factory, random_checkpoints) -> tuple[Path, str]:
    """Every served variant, fp32 ONNX Runtime; returns (dir, build output)."""
    out = tmp_path_factory.mktemp("repo") / "model_repository"
    return out, build(out, SERVED_MODELS, random_checkpoints, *REFERENCE_RUNTIME)


@pytest.fixture(scope="session")
def default_runtime_repository(tmp_path_factory, random_checkpoints) -> tuple[Path, str]:
    """MobileSAM and EfficientViT-SAM-L0 in the default CPU runtime (OpenVINO bf16
    where the CPU has native bf16); returns (dir, build output)."""
    out = tmp_path_factory.mktemp("repo_default_runtime") / "model_repository"
    return out, build(out, DEFAULT_RUNTIME_MODELS, random_checkpoints)


@dataclass
class RunningServer:
    http_port: int
    grpc_port: int
    metrics_port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def url(self, protocol: str) -> str:
        return self.grpc_url if protocol == "grpc" else self.http_url

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def embedding_cache_events(self, model: str) -> dict[str, int]:
        """`model`'s embedding-cache counters (hit, miss, shared, eviction) from the metrics endpoint."""
        import re
        import urllib.request

        from samtriton import spec

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        events = {"hit": 0, "miss": 0, "shared": 0, "eviction": 0}
        for line in text.splitlines():
            if line.startswith(spec.EMBEDDING_CACHE_EVENTS_METRIC + "{") and f'model="{model}"' in line:
                events[re.search(r'event="(\w+)"', line).group(1)] = int(float(line.rsplit(" ", 1)[1]))
        return events


@pytest.fixture(scope="session")
def triton_server(built_repository, tmp_path_factory):
    yield from _serve(built_repository[0], tmp_path_factory)


@pytest.fixture(scope="session")
def default_runtime_server(default_runtime_repository, tmp_path_factory):
    yield from _serve(default_runtime_repository[0], tmp_path_factory)


def _serve(repo: Path, tmp_path_factory):
    """A tritonserver on `repo` on free ports, stopped when the session ends."""
    from samtriton import server

    ports = server.free_ports(3)
    log_path = tmp_path_factory.mktemp("server") / "tritonserver.log"
    with open(log_path, "wb") as log:
        proc = server.start(server.ServerOptions(repo, *ports), stdout=log, stderr=log)
    running = RunningServer(*ports, proc=proc, log_path=log_path)
    try:
        server.wait_ready(proc, ports[0])
    except Exception:
        server.stop(proc)
        pytest.fail(f"tritonserver did not become ready:\n{running.log_tail()}")
    yield running
    server.stop(proc)


class UpstreamPredictor:
    """A variant's own upstream predictor (in-process PyTorch), loaded the upstream way."""

    def __init__(self, model: str, checkpoint: Path):
        if model == "mobilesam":
            from mobile_sam import SamPredictor, sam_model_registry

            sam = sam_model_registry["vit_t"](checkpoint=str(checkpoint))
            sam.eval()  # after loading, as upstream's README does: TinyViT caches attention biases on eval()
            self.predictor = SamPredictor(sam)
            from mobile_sam import SamAutomaticMaskGenerator as generator
        elif model.startswith("efficientvit-sam-"):
            from efficientsam.models.efficientvit.sam import EfficientViTSamPredictor
            from efficientsam.sam_model_zoo import create_efficientvit_sam_model

            sam = create_efficientvit_sam_model(model, pretrained=True, weight_url=str(checkpoint)).eval()
            self.predictor = EfficientViTSamPredictor(sam)
            from efficientsam.models.efficientvit.sam import EfficientViTSamAutomaticMaskGenerator as generator
        elif model == "sam-vit-b":
            from segment_anything import SamPredictor, sam_model_registry

            sam = sam_model_registry["vit_b"](checkpoint=str(checkpoint)).eval()
            self.predictor = SamPredictor(sam)
            from segment_anything import SamAutomaticMaskGenerator as generator
        else:
            raise KeyError(model)
        self.sam, self._generator = sam, generator
        self._image_key = None

    def generate(self, image_bytes: bytes, **params) -> list[dict]:
        """The variant's own automatic mask generator (its own predictor), COCO RLE output."""
        import torch
        from PIL import ImageOps

        rgb = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(image_bytes))).convert("RGB"))
        with torch.no_grad():
            return self._generator(self.sam, output_mode="coco_rle", **params).generate(rgb)

    def _set_image(self, image_bytes: bytes) -> tuple[int, int]:
        from PIL import ImageOps

        rgb = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(image_bytes))).convert("RGB"))
        if self._image_key != image_bytes:
            self.predictor.set_image(rgb)
            self._image_key = image_bytes
        return rgb.shape[:2]

    def _to_frame(self, coords, size, boxes: bool):
        """Original pixels -> the prompt frame, with the predictor's own transform."""
        import torch

        t = torch.from_numpy(np.asarray(coords, np.float32))
        transform = self.predictor.transform
        if type(self.predictor).__name__ == "EfficientViTSamPredictor":  # uses the sizes set_image recorded
            return transform.apply_boxes_torch(t) if boxes else transform.apply_coords_torch(t)
        return transform.apply_boxes_torch(t, size) if boxes else transform.apply_coords_torch(t, size)

    def predict_prompts(self, image_bytes: bytes, boxes=None, points=None, labels=None, mask_input=None,
                        multimask: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`predict_torch` on B prompts of the same kinds, as upstream batches them:
        boxes (B, 4), points (B, P, 2) with labels (B, P), mask_input (B, 256, 256),
        all in original pixels; returns masks (B, K, H, W) bool, scores (B, K) and
        low-res logits (B, K, 256, 256), K = 3 with multimask, else 1."""
        import torch

        size = self._set_image(image_bytes)
        coords = None if points is None else self._to_frame(points, size, boxes=False)
        label_t = None if labels is None else torch.from_numpy(np.asarray(labels, np.int32))
        box_t = None if boxes is None else self._to_frame(boxes, size, boxes=True)
        mask_t = None if mask_input is None else torch.from_numpy(np.array(mask_input, np.float32))[:, None]
        with torch.no_grad():
            masks, iou, low_res = self.predictor.predict_torch(coords, label_t, boxes=box_t, mask_input=mask_t,
                                                               multimask_output=multimask)
        return masks.numpy(), iou.numpy(), low_res.numpy()

    def predict(self, image_bytes: bytes, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(masks (N, H, W) bool, scores (N,)) for single-mask box prompts."""
        masks, iou, _ = self.predict_prompts(image_bytes, boxes=boxes)
        return masks[:, 0], iou[:, 0]


@pytest.fixture(scope="session")
def upstream_predictors(random_checkpoints):
    """model name -> UpstreamPredictor on the served checkpoint, built on first use."""
    cache: dict[str, UpstreamPredictor] = {}

    def get(model: str) -> UpstreamPredictor:
        if model not in cache:
            cache[model] = UpstreamPredictor(model, random_checkpoints[model])
        return cache[model]

    return get


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def random_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    x0 = rng.uniform(0, width * 0.8, n)
    y0 = rng.uniform(0, height * 0.8, n)
    x1 = np.minimum(x0 + rng.uniform(8, width * 0.6, n), width)
    y1 = np.minimum(y0 + rng.uniform(8, height * 0.6, n), height)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    inter = (a & b).sum(axis=1)
    union = (a | b).sum(axis=1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def infer(grpc_url: str, model: str, inputs: dict[str, np.ndarray], outputs: list[str],
          parameters: dict | None = None, timeout_s: float = 120.0) -> dict[str, np.ndarray]:
    """One tritonclient gRPC request to `model` with exactly `inputs`, on a client of its
    own (closed before this returns); the `outputs` it asked for, by name."""
    import tritonclient.grpc as g
    from tritonclient.utils import np_to_triton_dtype

    client = g.InferenceServerClient(grpc_url)
    try:
        tensors = []
        for name, array in inputs.items():
            tensors.append(g.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype)))
            tensors[-1].set_data_from_numpy(array)
        r = client.infer(model, tensors, outputs=[g.InferRequestedOutput(n) for n in outputs],
                         parameters=parameters, client_timeout=timeout_s)
        return {n: r.as_numpy(n) for n in outputs}
    finally:
        client.close()


def decoder_prompt_inputs(request) -> dict[str, np.ndarray]:
    """A `decoder_batch.DecoderRequest`'s prompt tensors, as the ensemble passes them to the decoder."""
    from samtriton import spec

    return {spec.PROMPT_COORDS_NAME: request.coords, spec.PROMPT_LABELS_NAME: request.labels,
            spec.MODEL_MASK_INPUTS_NAME: request.mask_inputs, spec.HAS_MASK_INPUT_NAME: request.has_mask_input}
