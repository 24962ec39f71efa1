"""The `samtriton` command: build a model repository, serve it, segment with it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from samtriton import spec


def _parse_box(text: str) -> list[float]:
    parts = text.split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"expected x0,y0,x1,y1, got {text!r}")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected four numbers x0,y0,x1,y1, got {text!r}") from None


def _parse_point(text: str) -> tuple[float, float, int]:
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected x,y or x,y,label (label 1 foreground, 0 background), got {text!r}")
    try:
        x, y = float(parts[0]), float(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers x,y[,label], got {text!r}") from None
    if label not in (0, 1):
        raise argparse.ArgumentTypeError(f"label must be 1 (foreground) or 0 (background), got {label}")
    return x, y, label


def cmd_models(args) -> int:
    from samtriton.variants import DEFAULT_MODEL, MODEL_REGISTRY

    if args.model_repository:
        return _repository_models(Path(args.model_repository))
    print(f"{'model':<22}{'input':>11}{'params':>10}  {'checkpoint':<24}{'sha256':<10}ensemble")
    for v in MODEL_REGISTRY.values():
        size = f"{v.encoder_size}x{v.encoder_size}"
        pinned = "pinned" if v.checkpoint_sha256 else "-"
        default = "  (default: also `sam`)" if v.name == DEFAULT_MODEL else ""
        print(f"{v.name:<22}{size:>11}{v.parameters / 1e6:>9.1f}M  {v.checkpoint_file:<24}{pinned:<10}"
              f"{v.ensemble}{default}")
    return 0


def _repository_models(repo: Path) -> int:
    """The variants a built repository serves: weights, each step's runtime and its gate figures."""
    from samtriton.build.accuracy_gate import GateReport
    from samtriton.build.configs import parse_pbtxt
    from samtriton.variants import get_variant

    configs = {p.parent.name: parse_pbtxt(p.read_text()) for p in sorted(repo.glob("*/config.pbtxt"))}
    if spec.POSTPROCESS not in configs:
        print(f"samtriton models: {repo} is not a samtriton model repository (no {spec.POSTPROCESS}/config.pbtxt)",
              file=sys.stderr)
        return 1
    default = configs[spec.ENSEMBLE].parameters[spec.VARIANT_PARAMETER].string_value
    for name in configs[spec.POSTPROCESS].parameters["samtriton_models"].string_value.split(","):
        names = spec.model_names(get_variant(name).slug)
        params = {k: v.string_value for k, v in configs[names.image_encoder].parameters.items()}
        print(f"{name}{'  (default: also `sam`)' if name == default else ''}: {params['weights']}")
        for step in (names.image_encoder, names.mask_decoder):
            cfg = configs[step]
            params = {k: v.string_value for k, v in cfg.parameters.items()}
            if cfg.platform == "tensorrt_plan":
                print(f"  {step:<34} TensorRT plan (gate run by `samtriton build-engines`)")
                continue
            figures = ""
            if all(k in params for k in GateReport.PARAMETERS):
                figures = (f": mean mask IoU {params['gate_mean_mask_iou']}, min {params['gate_min_mask_iou']}, "
                           f"max score diff {params['gate_max_score_diff']}")
            print(f"  {step:<34} {params.get('runtime', 'onnxruntime')} {params.get('precision', 'fp32')}"
                  f"  gate: {params.get('gate', 'reference (fp32 ONNX Runtime)')}{figures}")
    return 0


def _per_model(values: list[str] | None, models: list[str], option: str) -> dict[str, str]:
    """`--checkpoint` / `--checkpoint-sha256` values: `NAME=VALUE`, or plain values in --model order."""
    values = values or []
    named, plain = {}, []
    for value in values:
        name, sep, rest = value.partition("=")
        if sep and name in models:
            named[name] = rest
        else:
            plain.append(value)
    if plain and named:
        raise ValueError(f"{option}: use either NAME=VALUE for every value or none")
    if plain:
        if len(plain) != len(models):
            raise ValueError(f"{option}: {len(plain)} values for {len(models)} models (one per --model, "
                             "in the same order, or NAME=VALUE)")
        return dict(zip(models, plain))
    return named


def serving_options(args):
    """The repository's serving knobs from `samtriton build`'s arguments."""
    from samtriton.build.configs import ServingOptions
    from samtriton.serving.prompts import Limits

    # Options left out take the target's defaults (ServingOptions.for_target).
    return ServingOptions.for_target(
        args.target,
        encoder_max_batch_size=args.encoder_max_batch_size,
        encoder_queue_delay_us=args.encoder_queue_delay_us,
        encoder_preferred_batch_sizes=(None if args.encoder_preferred_batch_sizes is None
                                       else tuple(args.encoder_preferred_batch_sizes)),
        decoder_max_batch_size=args.decoder_max_batch_size,
        decoder_queue_delay_us=args.decoder_queue_delay_us,
        encoder_max_misses=args.encoder_max_misses,
        encoder_max_queue_size=args.encoder_max_queue_size,
        decoder_max_queue_size=args.decoder_max_queue_size,
        queue_timeout_s=args.queue_timeout_s,
        intra_op_threads=args.intra_op_threads,
        everything_instances=args.everything_instances,
        everything_decoder_prompts=args.everything_decoder_prompts,
        everything_decoder_window=args.everything_decoder_window,
        everything_max_queue_size=args.everything_max_queue_size,
        embedding_cache_mb=args.embedding_cache_mb,
        encoder_response_cache=args.encoder_response_cache or None,
        cpu_warmup=False if args.no_cpu_warmup else None,
        embedding_handoff=False if args.no_embedding_handoff else None,
        embedding_handoff_spare_slots=args.embedding_handoff_spare_slots,
        **step_runtimes(args),
        limits=Limits(max_image_bytes=args.max_image_bytes, max_pixels=args.max_pixels, max_boxes=args.max_boxes,
                      max_points=args.max_points),
    )


def step_runtimes(args) -> dict:
    """--encoder-runtime/--encoder-precision and the decoder's -> ServingOptions fields.

    A runtime given alone runs at its own default precision (OpenVINO: the
    default step's, bf16; ONNX Runtime: fp32); a precision alone keeps the
    default runtime."""
    from samtriton.build.configs import ServingOptions
    from samtriton.serving.cpu_runtime import FP32, OPENVINO, StepRuntime

    defaults = ServingOptions()
    out = {}
    for step in ("encoder", "decoder"):
        runtime, precision = getattr(args, f"{step}_runtime"), getattr(args, f"{step}_precision")
        if runtime is None and precision is None:
            continue
        if args.target != "cpu":
            raise ValueError(f"--{step}-runtime/--{step}-precision choose the CPU target's runtimes; the GPU target "
                             "runs TensorRT (build-engines --fp32 for fp32)")
        default = getattr(defaults, f"{step}_runtime")
        runtime = runtime or default.runtime
        if precision is None:
            precision = default.precision if runtime == OPENVINO == default.runtime else FP32
        try:
            out[f"{step}_runtime"] = StepRuntime(runtime, precision)
        except ValueError as e:
            raise ValueError(f"--{step}-runtime/--{step}-precision: {e}") from None
    return out


def cmd_build(args) -> int:
    from samtriton.build.checkpoint import CheckpointError
    from samtriton.build.download import CheckpointDownloadError, resolve_checkpoint
    from samtriton.build.accuracy_gate import GateError
    from samtriton.build.memory import bound_malloc_arenas
    from samtriton.build.repository import ModelSource, ParityError, build_repository
    from samtriton.variants import UnknownModelError, get_variant

    def fail(message, code=1):
        print(f"samtriton build: {message}", file=sys.stderr)
        return code

    models = list(dict.fromkeys(args.model))  # once each, in the order given
    try:
        variants = [get_variant(name) for name in models]
        if args.default is not None:
            get_variant(args.default)
        checkpoints = _per_model(args.checkpoint, models, "--checkpoint")
        sha256s = _per_model(args.checkpoint_sha256, models, "--checkpoint-sha256")
        options = serving_options(args)
    except (UnknownModelError, ValueError) as e:
        return fail(e, 2)
    if args.random_weights and (checkpoints or sha256s):
        return fail("--random-weights excludes --checkpoint and --checkpoint-sha256", 2)
    bound_malloc_arenas()  # the build's peak memory (perf/build_memory.py)
    try:
        sources = []
        for variant in variants:
            if args.random_weights:
                sources.append(ModelSource(variant, random_seed=args.seed))
            else:
                path = resolve_checkpoint(variant, checkpoints.get(variant.name), sha256s.get(variant.name))
                sources.append(ModelSource(variant, checkpoint=path))
        build_repository(sources, args.out, options=options, default=args.default)
    except (CheckpointError, CheckpointDownloadError, ParityError, GateError, FileNotFoundError, ValueError) as e:
        return fail(e)
    return 0


def cmd_build_engines(args) -> int:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        print("samtriton build-engines: the `tensorrt` Python package is not installed (it needs an NVIDIA GPU; "
              "the Docker image in docker/ has it)", file=sys.stderr)
        return 2
    from samtriton.build.engines import EngineBuildError, build_repository_engines

    try:
        built = build_repository_engines(Path(args.model_repository), Path(args.cache_dir), fp16=not args.fp32)
    except EngineBuildError as e:
        print(f"samtriton build-engines: {e}", file=sys.stderr)
        return 1
    print(f"samtriton build-engines: {built} engine(s) built, the others taken from {args.cache_dir}")
    return 0


RANDOM_WEIGHTS_BANNER = """\
======================================================================
 This repository was built from RANDOM WEIGHTS ({models}): the masks
 are meaningless. For real masks, rebuild from the official checkpoints:
   samtriton build --model NAME --out DIR   (downloads and verifies it)
   samtriton build --model NAME --checkpoint /path/file.pt --out DIR
 or: make serve SAM_CHECKPOINT=/path/mobile_sam.pt
======================================================================"""


def _check_repository(repo: Path, command: str) -> bool:
    """Is `repo` a built samtriton repository? Warns loudly if it holds random weights."""
    from samtriton.build.configs import parse_pbtxt

    if not (repo / "sam" / "config.pbtxt").exists():
        print(f"samtriton {command}: {repo} is not a samtriton model repository (run `samtriton build` first)",
              file=sys.stderr)
        return False
    random_models = set()
    for config in repo.glob("*/config.pbtxt"):
        params = parse_pbtxt(config.read_text()).parameters
        if params["random_weights"].string_value == "true":
            random_models.add(params[spec.VARIANT_PARAMETER].string_value)
    if random_models:
        print(RANDOM_WEIGHTS_BANNER.format(models=", ".join(sorted(random_models))), file=sys.stderr)
    return True


def _ensemble_name(args) -> str:
    """`--model NAME` (a variant) or `--model-name` (a Triton ensemble) -> the ensemble to call."""
    if args.model is not None:
        from samtriton.variants import get_variant

        return get_variant(args.model).ensemble
    return args.model_name


def cmd_serve(args) -> int:
    from samtriton import server

    repo = Path(args.model_repository)
    if not _check_repository(repo, "serve"):
        return 2
    if any('platform: "tensorrt_plan"' in p.read_text() for p in repo.glob("*/config.pbtxt")):
        print(f"samtriton serve: {repo} is a GPU-target repository (TensorRT models); this tritonserver has "
              "only the python backend. Serve it with the image in docker/ (see docker/README.md).", file=sys.stderr)
        return 2
    opts = server.ServerOptions(
        model_repository=repo,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        cache_bytes=int(args.cache_size_mb * 1024 * 1024),
        embedding_cache_mb=args.embedding_cache_mb,
        log_verbose=args.log_verbose,
        **({"admin_header": f"samtriton-admin-key:{os.environ['SAMTRITON_ADMIN_KEY']}"}
           if os.environ.get("SAMTRITON_ADMIN_KEY") else {}),
    )
    print(
        f"samtriton: serving {repo} over HTTP :{args.http_port}, gRPC :{args.grpc_port}, "
        f"metrics :{args.metrics_port} (Ctrl-C stops it after in-flight requests finish)",
        file=sys.stderr,
    )
    return server.run_foreground(opts)


def _prompt_text(result, i: int) -> str:
    parts = []
    if result.boxes is not None and np.isfinite(result.boxes[i]).all():
        parts.append("box=" + ",".join(f"{v:g}" for v in result.boxes[i]))
    if result.points is not None:
        clicks = [f"{x:g},{y:g}{'+' if label == 1 else '-'}"
                  for (x, y), label in zip(result.points[i], result.point_labels[i]) if label >= 0]
        if clicks:
            parts.append("points=" + " ".join(clicks))
    return " ".join(parts)


def _print_result(result) -> None:
    for i in range(len(result)):
        if result.multimask:
            candidates = ", ".join(f"{s:.4f} ({int(a)} px)" for s, a in zip(result.scores[i], result.areas[i]))
            print(f"mask {i}: candidates {candidates} {_prompt_text(result, i)}")
        else:
            print(f"mask {i}: score={result.scores[i]:.4f} area={int(result.areas[i])} {_prompt_text(result, i)}")


def _write_json(path, image_label, result) -> None:
    from samtriton.serving.postprocessing import encode_rle

    def rle_of(mask):
        return json.loads(encode_rle(mask[np.newaxis])[0])

    def entry(i):
        doc = {}
        if result.boxes is not None and np.isfinite(result.boxes[i]).all():
            doc["box"] = [float(v) for v in result.boxes[i]]
        if result.points is not None:
            keep = result.point_labels[i] >= 0
            doc["points"] = result.points[i][keep].tolist()
            doc["point_labels"] = result.point_labels[i][keep].tolist()
        if result.multimask:
            doc["candidates"] = [{"score": float(s), "area": int(a), "segmentation": rle_of(m)}
                                 for s, a, m in zip(result.scores[i], result.areas[i], result.masks[i])]
        else:
            doc.update(score=float(result.scores[i]), area=int(result.areas[i]), segmentation=rle_of(result.masks[i]))
        return doc

    doc = {
        "image": image_label,
        "height": int(result.masks.shape[-2]),
        "width": int(result.masks.shape[-1]),
        "multimask": result.multimask,
        "masks": [entry(i) for i in range(len(result))],
    }
    Path(path).write_text(json.dumps(doc, indent=1))


def cmd_segment(args) -> int:
    from samtriton.client import SamClient, SamTritonError
    from samtriton.client.overlay import draw_overlay

    from samtriton.variants import UnknownModelError

    def usage(message):
        print(f"samtriton segment: {message}", file=sys.stderr)
        return 2

    boxes = args.box or None
    points = labels = None
    if args.point:
        if boxes is not None and len(boxes) > 1:
            return usage("--point with several --box is ambiguous: the points refine one object; give one --box "
                         "(box + points) or none (points only), or use the SDK's Prompt for mixed prompts")
        points = [[[x, y] for x, y, _ in args.point]]
        labels = [[label for _, _, label in args.point]]
    if boxes is None and points is None:
        return usage("give at least one --box x0,y0,x1,y1 or --point x,y[,label]")
    mask_input = None
    if args.mask_input:
        try:
            mask_input = np.load(args.mask_input)
        except (OSError, ValueError) as e:
            return usage(f"--mask-input: cannot read {args.mask_input} as a .npy array ({e})")
    try:
        model_name = _ensemble_name(args)
    except UnknownModelError as e:
        return usage(e)
    try:
        with SamClient(args.url, protocol=args.protocol, model_name=model_name) as client:
            started = time.perf_counter()
            result = client.segment(args.image, boxes, points=points, point_labels=labels, mask_input=mask_input,
                                    multimask=args.multimask, return_low_res_logits=bool(args.save_logits))
            elapsed = time.perf_counter() - started
    except SamTritonError as e:
        print(f"samtriton segment: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"samtriton segment: {e}", file=sys.stderr)
        return 1
    _print_result(result)
    print(f"{len(result)} prompts in {elapsed * 1000:.0f} ms", file=sys.stderr)
    if args.overlay:
        best = result.best()
        draw_overlay(args.image, best.masks, best.boxes, points=best.points, point_labels=best.point_labels
                     ).save(args.overlay)
        print(f"wrote {args.overlay}" + (" (best candidate per prompt)" if result.multimask else ""), file=sys.stderr)
    if args.json:
        _write_json(args.json, str(args.image), result)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.save_logits:
        np.save(args.save_logits, result.low_res_logits)
        print(f"wrote {args.save_logits} (low-res logits {list(result.low_res_logits.shape)}; pass one "
              "[N, 256, 256] slice back with --mask-input)", file=sys.stderr)
    return 0


def cmd_everything(args) -> int:
    from samtriton.client import SamClient, SamTritonError
    from samtriton.client.overlay import draw_overlay
    from samtriton.serving.automatic_masks import GeneratorParameters
    from samtriton.variants import UnknownModelError, get_variant

    params = {name: getattr(args, name) for name in GeneratorParameters.names() if getattr(args, name) is not None}
    model_name = args.model_name
    try:
        if args.model:
            model_name = spec.model_names(get_variant(args.model).slug).everything
    except UnknownModelError as e:
        print(f"samtriton everything: {e}", file=sys.stderr)
        return 2
    try:
        with SamClient(args.url, protocol=args.protocol, everything_model_name=model_name,
                       timeout_s=args.timeout_s) as client:
            started = time.perf_counter()
            result = client.segment_everything(args.image, args.box or None, **params)
            elapsed = time.perf_counter() - started
    except (SamTritonError, OSError) as e:
        print(f"samtriton everything: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    for i, record in enumerate(result.annotations()[:20]):
        print(f"mask {i}: predicted_iou={record['predicted_iou']:.4f} stability={record['stability_score']:.4f} "
              f"area={record['area']} bbox={record['bbox']}")
    if len(result) > 20:
        print(f"... {len(result) - 20} more")
    print(f"{len(result)} masks in {elapsed:.1f} s", file=sys.stderr)
    if args.overlay:
        draw_overlay(args.image, result.masks, None).save(args.overlay)
        print(f"wrote {args.overlay}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"image": str(args.image), "masks": result.annotations()}))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _click_session(client, image_path, boxes: np.ndarray) -> list[tuple[str, object, float]]:
    """What an annotator does: encode once, then click, click, click, each click
    a decoder-only request on the cached image, the last one refining the
    previous answer with its low-res logits."""
    started = time.perf_counter()
    encoded = client.encode(image_path)
    steps = [("encode (the image encoder, once)", None, time.perf_counter() - started)]
    house, door = boxes[1], boxes[2]
    inside = [float(house[0] + 0.2 * (house[2] - house[0])), float((house[1] + house[3]) / 2)]
    on_door = [float((door[0] + door[2]) / 2), float((door[1] + door[3]) / 2)]
    clicks = [  # (what, prompt, refine the previous answer)
        ("click 1: one foreground point, 3 candidates", dict(points=[inside], multimask=True), False),
        ("click 2: + a background point on the door", dict(points=[inside, on_door], point_labels=[1, 0]), False),
        ("click 3: the same, refining click 2's mask", dict(points=[inside, on_door], point_labels=[1, 0]), True),
    ]
    previous = None
    for label, prompt, refine in clicks:
        if refine:
            prompt["mask_input"] = previous.low_res_logits[:, 0]
        started = time.perf_counter()
        previous = client.decode(encoded, **prompt, return_low_res_logits=True).best()
        steps.append((label, previous, time.perf_counter() - started))
    return steps


def cmd_demo(args) -> int:
    """Start a server in the background, segment the sample scene with boxes, then
    run a click session on it; write both overlays; stop."""
    from samtriton import server
    from samtriton.client import SamClient
    from samtriton.client.overlay import draw_overlay
    from samtriton.sample_image import sample_scene

    if not _check_repository(Path(args.model_repository), "demo"):
        return 2
    image, boxes = sample_scene()
    out = Path(args.overlay)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_path = out.with_name("demo_input.jpg")
    clicks_out = out.with_name(out.stem + "_clicks" + out.suffix)
    image.save(image_path, quality=92)
    # The click session's image: the same scene losslessly, new pixels to the
    # encoder's cache (JPEG changed them), so its encode step really runs.
    clicks_image = out.with_name("demo_input.png")
    image.save(clicks_image)
    http, grpc, metrics = server.free_ports(3)
    with tempfile.TemporaryFile() as log:
        proc = server.start(server.ServerOptions(Path(args.model_repository), http, grpc, metrics),
                            stdout=log, stderr=log)
        try:
            server.wait_ready(proc, http)
            with SamClient(f"localhost:{grpc}", protocol="grpc", model=args.model) as client:
                started = time.perf_counter()
                result = client.segment(image_path, boxes)
                elapsed = time.perf_counter() - started
                steps = _click_session(client, clicks_image, boxes)
                everything_params = _demo_everything_params(Path(args.model_repository))
                started = time.perf_counter()
                everything = client.segment_everything(image_path, **everything_params)
                everything_s = time.perf_counter() - started
        except Exception:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            server.stop(proc)
    _print_result(result)
    print(f"{len(result)} masks in {elapsed * 1000:.0f} ms", file=sys.stderr)
    draw_overlay(image_path, result.masks, result.boxes).save(out)
    print("click session on the same scene (a new image: encoded once, then decoder-only requests):")
    for label, answer, seconds in steps:
        score = "" if answer is None else f"  score={answer.scores[0]:.4f} area={int(answer.areas[0])}"
        print(f"  {label:<45} {seconds * 1000:7.0f} ms{score}")
    last = steps[-1][1]
    draw_overlay(image_path, last.masks, None, points=last.points, point_labels=last.point_labels).save(clicks_out)
    everything_out = out.with_name(out.stem + "_everything" + out.suffix)
    draw_overlay(image_path, everything.masks, None).save(everything_out)
    print(f"segment everything ({', '.join(f'{k}={v}' for k, v in everything_params.items())}): "
          f"{len(everything)} masks in {everything_s:.1f} s")
    print(f"wrote {image_path}, {out}, {clicks_out} and {everything_out}")
    return 0


def _demo_everything_params(repo: Path) -> dict:
    """An 8 x 8 grid; upstream's thresholds, lowered to 0 for random weights (whose predicted
    IoUs are ~0.1 and logits flat: upstream's thresholds would keep no mask)."""
    from samtriton.serving.pipeline import repository_parameters

    params = {"points_per_side": 8}
    if repository_parameters(repo, spec.EVERYTHING).get("random_weights") == "true":
        params.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)
    return params


def build_parser() -> argparse.ArgumentParser:
    from samtriton import server as server_defaults
    from samtriton.build.configs import ServingOptions
    from samtriton.serving.cpu_runtime import PRECISIONS, RUNTIMES

    defaults = ServingOptions()

    parser = argparse.ArgumentParser(prog="samtriton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model variants that can be built, or those a repository serves")
    p.add_argument("--model-repository", metavar="DIR",
                   help="list this built repository's variants: weights, each step's runtime, precision and "
                        "accuracy-gate figures")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("build", help="export ONNX and write a Triton model repository")
    p.add_argument("--target", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: ONNX Runtime or OpenVINO in python models (this tritonserver); gpu: TensorRT models for the "
                        "NGC image, engines built on the serving GPU by `samtriton build-engines`")
    p.add_argument("--model", nargs="+", default=["mobilesam"], metavar="NAME",
                   help="model variants to put in the repository, side by side (see `samtriton models`)")
    p.add_argument("--default", metavar="NAME",
                   help="the variant that also answers as `sam` / `sam_encode` (default: the first --model)")
    p.add_argument("--checkpoint", action="append", metavar="PATH|URL",
                   help="official checkpoint file or URL; one per --model in order, or NAME=PATH|URL. "
                        "Without it the official URL is downloaded, verified by sha256 and cached "
                        "under $XDG_CACHE_HOME/samtriton")
    p.add_argument("--checkpoint-sha256", action="append", metavar="HEX",
                   help="expected sha256 of the checkpoint (same forms as --checkpoint)")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights in the official layout: for tests, masks are meaningless")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    p.add_argument("--out", required=True, help="model repository directory to write")
    gpu = ServingOptions.for_target("gpu")
    p.add_argument("--encoder-max-batch-size", type=int,
                   help=f"default {defaults.encoder_max_batch_size} (cpu), {gpu.encoder_max_batch_size} (gpu)")
    p.add_argument("--encoder-queue-delay-us", type=int,
                   help=f"default {defaults.encoder_queue_delay_us} (cpu), {gpu.encoder_queue_delay_us} (gpu)")
    p.add_argument("--encoder-preferred-batch-sizes", type=int, nargs="*", metavar="N")
    p.add_argument("--decoder-max-batch-size", type=int,
                   help="requests per decoder call (ragged batching); default "
                        f"{defaults.decoder_max_batch_size} (cpu), {gpu.decoder_max_batch_size} (gpu)")
    p.add_argument("--decoder-queue-delay-us", type=int)
    p.add_argument("--encoder-max-misses", type=int,
                   help="new images being embedded at once beyond this are refused with UNAVAILABLE (0: unbounded); "
                        f"default {defaults.encoder_max_misses} (cpu), {gpu.encoder_max_misses} (gpu)")
    p.add_argument("--encoder-max-queue-size", type=int,
                   help="a Triton queue policy on the encoder: requests waiting beyond this are refused with "
                        "UNAVAILABLE; default 0, no policy (a policy stops Triton's batcher from prefetching: "
                        "up to 500 ms idle between batches under load, see README)")
    p.add_argument("--queue-timeout-s", type=float,
                   help="a Triton queue policy on the encoder and decoder: a request queued longer than this is "
                        "refused with UNAVAILABLE; default 0, no policy")
    p.add_argument("--decoder-max-queue-size", type=int,
                   help="the same as --encoder-max-queue-size for the decoder; default 0, no policy")
    p.add_argument("--intra-op-threads", type=int, default=defaults.intra_op_threads,
                   help="ONNX Runtime / OpenVINO threads per model instance (0: all cores)")
    for step in ("encoder", "decoder"):
        default = getattr(defaults, f"{step}_runtime")
        p.add_argument(f"--{step}-runtime", choices=RUNTIMES,
                       help=f"cpu target: the {step}'s runtime (default {default.runtime})")
        p.add_argument(f"--{step}-precision", choices=PRECISIONS,
                       help=f"cpu target: the {step}'s precision (default {default.precision} with openvino, on CPUs "
                            "with native bf16, else fp32; anything but onnxruntime fp32 must pass the accuracy gate)")
    p.add_argument("--everything-instances", type=int,
                   help=f"sam_everything requests served at once per model; default {defaults.everything_instances}")
    p.add_argument("--everything-decoder-prompts", type=int,
                   help="prompts per decoder request of sam_everything (smaller: other clients wait less behind "
                        f"it); default {defaults.everything_decoder_prompts}")
    p.add_argument("--everything-decoder-window", type=int,
                   help="decoder requests sam_everything keeps in flight (2 overlaps its filtering with the "
                        f"decoder, 1 keeps the decoder's queue short); default {defaults.everything_decoder_window}")
    p.add_argument("--everything-max-queue-size", type=int,
                   help="sam_everything requests waiting beyond those being served are refused at once with "
                        f"UNAVAILABLE (0: unbounded); default {defaults.everything_max_queue_size} (cpu), "
                        f"{gpu.everything_max_queue_size} (gpu)")
    p.add_argument("--embedding-cache-mb", type=int,
                   help="the embedding cache of each variant, in MiB (an embedding is 4 MiB; 0: off); default "
                        f"{defaults.embedding_cache_mb}")
    p.add_argument("--encoder-response-cache", action="store_true",
                   help="also enable Triton's response cache on the image encoders (keyed by the 12 MB encoder "
                        "input; sized by `samtriton serve --cache-size-mb`)")
    p.add_argument("--no-cpu-warmup", action="store_true",
                   help="CPU target: no warm-up request through each encoder and decoder at load (by default "
                        "Triton runs one, so that the runtimes' slow first call is not a client's)")
    p.add_argument("--no-embedding-handoff", action="store_true",
                   help="CPU target: the `sam` ensemble passes the decoder the 4 MiB embedding as a tensor, not a "
                        "handle to it in /dev/shm (which needs shared memory for the embedding cache plus "
                        f"{defaults.embedding_handoff_spare_slots} x 4 MiB: Docker's --shm-size)")
    p.add_argument("--embedding-handoff-spare-slots", type=int,
                   help="CPU target: slots of the shared-memory arena beyond the embedding cache, for embeddings "
                        f"on their way to the decoder; default {defaults.embedding_handoff_spare_slots}")
    p.add_argument("--max-image-bytes", type=int, default=defaults.limits.max_image_bytes)
    p.add_argument("--max-pixels", type=int, default=defaults.limits.max_pixels)
    p.add_argument("--max-boxes", type=int, default=defaults.limits.max_boxes,
                   help="prompts (boxes or point sets) per request")
    p.add_argument("--max-points", type=int, default=defaults.limits.max_points, help="points per prompt")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("build-engines", help="GPU target: build TensorRT engines on this GPU, with the accuracy gate")
    p.add_argument("--model-repository", required=True)
    p.add_argument("--cache-dir", default=os.environ.get("SAMTRITON_ENGINE_CACHE", "var/engines"),
                   help="engines kept per GPU name, TensorRT version, ONNX and profile ($SAMTRITON_ENGINE_CACHE)")
    p.add_argument("--fp32", action="store_true", help="no fp16 (the gate still runs)")
    p.set_defaults(func=cmd_build_engines)

    p = sub.add_parser("serve", help="run tritonserver on a model repository (foreground, CPU)")
    p.add_argument("--model-repository", required=True)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--cache-size-mb", type=float, default=server_defaults.DEFAULT_CACHE_BYTES / 2**20,
                   help="Triton's response cache, in MiB (0: off); used by repositories built with "
                        "--encoder-response-cache (the embedding cache is the image_embedding models' own)")
    p.add_argument("--embedding-cache-mb", type=float,
                   help="embedding cache per variant, in MiB (0: off), instead of the size the repository was "
                        "built with")
    p.add_argument("--log-verbose", type=int, default=0)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "segment", help="segment an image with box and point prompts on a running server",
        description="Segment an image on a running server.  Each --box is one prompt; --point clicks (repeat "
                    "them) refine one object: alone they are a points-only prompt, with one --box a box + points "
                    "prompt.  Coordinates are in the image's pixels.",
        epilog="examples:\n  samtriton segment photo.jpg --box 10,20,200,240 --box 300,40,520,400\n"
               "  samtriton segment photo.jpg --point 120,80 --point 300,90,0 --multimask\n"
               "  samtriton segment photo.jpg --box 10,20,200,240 --point 120,80 --save-logits prev.npy\n"
               "  samtriton segment photo.jpg --point 120,80 --point 150,60 --mask-input prev.npy",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="JPEG, PNG or WebP file")
    p.add_argument("--box", action="append", type=_parse_box, metavar="x0,y0,x1,y1",
                   help="a box in original pixels; repeat for more (one prompt each)")
    p.add_argument("--point", action="append", type=_parse_point, metavar="x,y[,label]",
                   help="a click in original pixels, label 1 foreground (default) or 0 background; repeat for more")
    p.add_argument("--multimask", action="store_true",
                   help="three candidate masks per prompt with their predicted IoU (for ambiguous single clicks)")
    p.add_argument("--mask-input", metavar="FILE.npy",
                   help="refine a previous answer: its low-res logits, [N, 256, 256] (see --save-logits)")
    p.add_argument("--save-logits", metavar="FILE.npy",
                   help="write the low-res logits [N, K, 256, 256] for a later --mask-input")
    p.add_argument("--url", default=None, help="server address (default localhost:8001 for gRPC, :8000 for HTTP)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="model variant, e.g. efficientvit-sam-l0 (default: the repository's default)")
    which.add_argument("--model-name", default="sam", help="Triton ensemble name, e.g. sam_efficientvit_l0")
    p.add_argument("--overlay", help="write a PNG with the masks and boxes drawn over the image")
    p.add_argument("--json", help="write the masks (COCO RLE), scores and boxes as JSON")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser(
        "everything", help="segment everything in an image (automatic mask generation) on a running server",
        description="Upstream's automatic mask generator, served by `sam_everything`: a grid of point prompts "
                    "(or --box prompts, e.g. from a detector), filtered by predicted IoU, stability and NMS.  "
                    "Unset options take upstream's defaults.",
        epilog="examples:\n  samtriton everything photo.jpg --overlay out.png --json out.json\n"
               "  samtriton everything photo.jpg --points-per-side 16 --crop-n-layers 1\n"
               "  samtriton everything photo.jpg --box 10,20,200,240 --box 300,40,520,400",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="JPEG, PNG or WebP file")
    from samtriton.serving.automatic_masks import GeneratorParameters

    for name, default in GeneratorParameters().__dict__.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=type(default), default=None,
                       help=f"default {default:g}")
    p.add_argument("--box", action="append", type=_parse_box, metavar="x0,y0,x1,y1",
                   help="box prompts instead of the point grid (repeat), e.g. a detector's")
    p.add_argument("--url", default=None, help="server address (default localhost:8001 for gRPC, :8000 for HTTP)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--timeout-s", type=float, default=600.0, help="give up (and cancel, over gRPC) after this")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="model variant, e.g. efficientvit-sam-l0 (default: the repository's default)")
    which.add_argument("--model-name", default=spec.EVERYTHING, help="Triton model name, e.g. sam_everything_mobilesam")
    p.add_argument("--overlay", help="write a PNG with the masks drawn over the image")
    p.add_argument("--json", help="write the masks as upstream's records (COCO RLE segmentation, bbox, ...)")
    p.set_defaults(func=cmd_everything)

    p = sub.add_parser("demo", help="serve in the background, segment a sample scene, write an overlay")
    p.add_argument("--model-repository", required=True)
    p.add_argument("--overlay", default="var/demo_overlay.png")
    p.add_argument("--model", help="model variant to call (default: the repository's default)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
