"""Check and demo: `--check` says what a run would use and what is wrong; `--demo` builds a demo.

Runs in the parent and changes nothing (`--check`), or writes only a new temporary folder
(`--demo`, which then runs the normal search on it).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .errors import BadInput
from .settings import Settings
from .folders import list_videos
from .gpulibs import library_lines, load_nvidia_libraries
from .providers import (
    both_onnxruntime_builds_problem, onnxruntime_gpu_build, optional_provider, package_version,
    provider_library, visible_gpus, working_providers)
from .models import classify_pack_models
from .references import list_reference_photos, read_image
from .index import index_path
from .clips import find_ffmpeg
from .run import no_photo_message, probe_all, videos_outside_output


def local_model_pack(model_root: str, pack: str) -> Path | None:
    """Return the pack folder if it is already on disk (no download)."""
    root = Path(model_root).expanduser()
    for candidate in (root / "models" / pack, root / pack):
        if candidate.is_dir() and any(candidate.glob("*.onnx")):
            return candidate
    return None


def check_lines(settings: Settings) -> tuple:
    """Return (report lines, problem count) of what a run with these settings would use."""
    import platform
    lines, problems = [], 0

    def say(ok: bool, text: str) -> None:
        nonlocal problems
        lines.append(f"  [{'ok' if ok else '!!'}] {text}")
        problems += not ok

    lines.append(f"Python {platform.python_version()} on {platform.system()} {platform.machine()}")
    for name in ("insightface", "onnxruntime", "onnxruntime-gpu", "av", "opencv-python",
                 "numpy", "tensorrt", "imageio-ffmpeg"):
        lines.append(f"  {name}: {package_version(name) or 'not installed'}")
    lines.append(f"  ray: {package_version('ray') or 'not installed (only --ray needs it: pip install -r requirements-ray.txt)'}")
    if settings.RAY_ADDRESS and not package_version("ray"):
        say(False, f"RAY_ADDRESS is {settings.RAY_ADDRESS!r} but Ray is not installed: pip install -r requirements-ray.txt")
    gpus = visible_gpus()
    where = "nvidia-smi lists none" if shutil.which("nvidia-smi") else "no nvidia-smi on PATH"
    lines.append(f"GPUs: {', '.join(gpus) if gpus else f'none found ({where})'}")
    gpu_install_lines(settings, gpus, lines, say)
    pack = local_model_pack(settings.MODEL_ROOT, settings.MODEL_PACK_NAME)
    if pack is None:
        say(False, f"model pack {settings.MODEL_PACK_NAME} not on disk: a run downloads it into "
                   f"{Path(settings.MODEL_ROOT).expanduser() / 'models' / settings.MODEL_PACK_NAME} "
                   f"(needs internet), or put its .onnx files there")
    else:
        provider_lines(settings, pack, lines, say)
    ffmpeg = find_ffmpeg(settings.FFMPEG_DIR)
    say(ffmpeg is not None, f"ffmpeg: {ffmpeg or 'not found (clips cannot be cut)'}")
    return lines, problems


def onnxruntime_distributions() -> list:
    """Return the installed ONNX Runtime distributions as "name version" (the CPU and GPU builds)."""
    return [f"{name} {package_version(name)}" for name in ("onnxruntime", "onnxruntime-gpu")
            if package_version(name)]


def gpu_install_lines(settings: Settings, gpus: list, lines: list, say) -> None:
    """Add what --check says of a GPU install: the ONNX Runtime distributions (exactly one is
    right), a GPU build on a machine where no GPU is found (unless --providers cpu), and, for
    onnxruntime-gpu, each CUDA, cuDNN and TensorRT library it links: from pip or the system, its
    version, or not found ([--]: the providers' lines below count what that breaks)."""
    installed = onnxruntime_distributions()
    both = both_onnxruntime_builds_problem()
    if both:
        say(False, both)
    else:
        lines.append(f"ONNX Runtime distributions: {', '.join(installed) or 'none'}")
    if not package_version("onnxruntime-gpu") or settings.PROVIDERS == "cpu":
        return
    if not gpus:
        say(False, "onnxruntime-gpu is installed, but no NVIDIA GPU was found: runs fall back to the "
                   "CPU. Install the NVIDIA driver (docs/gpu.md, Versions), or run with --providers cpu")
    try:
        import onnxruntime  # noqa: F401  (load_nvidia_libraries needs it; a broken one is said below)
    except Exception:  # a broken install is reported by provider_lines
        return
    load_nvidia_libraries(["CUDAExecutionProvider", "TensorrtExecutionProvider"])
    trt_library = provider_library("TensorrtExecutionProvider")
    lines.append(f"NVIDIA libraries ({onnxruntime_gpu_build()}; TensorRT is optional):")
    found_all = True
    for found, text in library_lines(trt_library):
        lines.append(f"  [{'ok' if found else '--'}] {text}")
        found_all = found_all and found
    if not found_all:
        lines.append("  (libraries not found: python install_gpu.py installs them from pip; docs/gpu.md)")


def provider_lines(settings: Settings, pack: Path, lines: list, say) -> None:
    """Add the model pack and each provider opened alone on its detector: [ok] loads, [!!] a
    problem, [--] optional here (not in this build; TensorRT not installed; any GPU provider with
    --providers cpu)."""
    try:
        detector, recognizer = classify_pack_models(pack)
        say(True, f"model pack: {pack} (detector {detector.name}, recognizer {recognizer.name})")
        for provider, verdict in working_providers(detector).items():
            unused = settings.PROVIDERS == "cpu" and provider != "CPUExecutionProvider"
            if unused or (optional_provider(provider, verdict) and settings.PROVIDERS == "auto"):
                lines.append(f"  [--] provider {provider}: {verdict}")  # optional here
            else:
                say(verdict == "loads", f"provider {provider}: {verdict}")
    except BadInput as error:
        say(False, str(error))
    except Exception as error:  # a broken install is what --check is for: say it, go on
        say(False, f"the models cannot be opened ({type(error).__name__}: {error}); "
                   f"reinstall: pip install -r requirements.txt (GPU: python install_gpu.py)")


def check_inputs(settings: Settings) -> tuple:
    """Return (report lines, problem count) about the videos and reference photos."""
    lines, problems = [], 0
    try:
        paths = videos_outside_output(list_videos(Path(settings.VIDEO_DIR)), Path(settings.OUTPUT_DIR))
        videos, video_problems = probe_all(paths, Path(settings.VIDEO_DIR))
        lines.append(f"videos in {settings.VIDEO_DIR}: {len(videos)} usable")
        lines += [f"  {Path(v.path).name}: {v.width}x{v.height}, {v.fps:.2f} fps, "
                  f"{v.duration_s:.1f} s" for v in videos]
        lines += [f"  [!!] {p}" for p in video_problems]
        indexed = sum(index_path(Path(settings.INDEX_DIR), v.output_name).is_file() for v in videos)
        lines.append(f"index folder {settings.INDEX_DIR}: {indexed} of these videos have an index "
                     f"(reused when still current: then they are not decoded again)")
        if not videos:
            lines.append(f"  [!!] no usable video in {settings.VIDEO_DIR}")
        problems += len(video_problems) + (not videos)
    except BadInput as error:
        lines.append(f"  [!!] {error}")
        problems += 1
    try:
        photos = list_reference_photos(Path(settings.REFERENCE_DIR))
        lines.append(f"reference photos in {settings.REFERENCE_DIR}: {len(photos)} people")
        for label, paths in photos.items():
            for path in paths:
                try:
                    read_image(path)
                    lines.append(f"  {label}: {path.name}")
                except BadInput as error:
                    lines.append(f"  [!!] {error}")
                    problems += 1
        if not photos:
            lines.append(f"  [!!] {no_photo_message(Path(settings.REFERENCE_DIR))}")
        problems += not photos
    except BadInput as error:
        lines.append(f"  [!!] {error}")
        problems += 1
    return lines, problems


def demo_frames(pictures: dict, size: tuple = (640, 360), fps: int = 10):
    """Yield the demo video's BGR frames: no face, the astronaut panned and zoomed, no face,
    the astronaut small again (about 10 s at fps)."""
    import cv2
    width, height = size

    def framed(image, scale, shift_x):
        canvas = np.zeros((height, width, 3), np.uint8)
        side = int(height * scale)
        small = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
        x0, y0 = (width - side) // 2 + shift_x, (height - side) // 2
        xa, xb = max(0, x0), min(width, x0 + side)
        ya, yb = max(0, y0), min(height, y0 + side)
        canvas[ya:yb, xa:xb] = small[ya - y0:yb - y0, xa - x0:xb - x0]
        return canvas

    for i in range(2 * fps):
        yield framed(pictures["coffee"], 1.0 + 0.1 * i / fps, 0)
    for i in range(4 * fps):
        yield framed(pictures["astronaut"], 1.0 + 0.3 * i / (4 * fps), int(120 - 240 * i / (4 * fps)))
    for i in range(2 * fps):
        yield framed(pictures["rocket"], 1.0, 0)
    for i in range(2 * fps):
        yield framed(pictures["astronaut"], 0.7, 0)


def prepare_demo(settings: Settings) -> Settings:
    """Build a demo in a new temporary folder and return settings that search it.

    The material ships with scikit-image (installed with insightface) and is free to use: NASA's
    public-domain astronaut portrait (Eileen Collins), plus pictures without faces. The reference
    photo is the portrait mirrored and resized, so the search has something to find.
    """
    import cv2
    import tempfile
    from skimage import data
    root = Path(tempfile.mkdtemp(prefix="find-people-demo-"))
    pictures = {name: cv2.cvtColor(getattr(data, name)(), cv2.COLOR_RGB2BGR)
                for name in ("astronaut", "coffee", "rocket")}
    (root / "samples_jpg").mkdir()
    (root / "in_video").mkdir()
    reference = cv2.resize(cv2.flip(pictures["astronaut"], 1), (400, 400), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(root / "samples_jpg" / "Eileen_Collins.jpg"), reference)
    writer = cv2.VideoWriter(str(root / "in_video" / "demo.mp4"), cv2.VideoWriter_fourcc(*"mp4v"),
                             10, (640, 360))
    if not writer.isOpened():
        raise BadInput(f"OpenCV cannot write {root / 'in_video' / 'demo.mp4'}")
    for frame in demo_frames(pictures):
        writer.write(frame)
    writer.release()
    print(f"[*] demo: {root} (a 10 s video and one reference photo; the astronaut is on screen "
          f"at 2-6 s and 8-10 s)")
    values = dict(settings.pairs)
    values.update(VIDEO_DIR=str(root / "in_video"), REFERENCE_DIR=str(root / "samples_jpg"),
                  OUTPUT_DIR=str(root / "found_fragments_colored_"), INDEX_DIR=str(root / "face_index"))
    return Settings(tuple(values.items()))


def run_check(settings: Settings) -> int:
    """Print what a run would use and what is wrong; change nothing. Return 0 if all is ready."""
    lines, problems = check_lines(settings)
    more, more_problems = check_inputs(settings)
    print("\n".join(lines + more))
    total = problems + more_problems
    print(f"{total} problem(s) found" if total else "ready: python main.py will run as shown")
    if more_problems:
        print("to see a complete run first, without your own files: python main.py --demo")
    return 1 if total else 0
