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
from .providers import (
    both_onnxruntime_builds_problem, optional_provider, package_version, visible_gpus,
    working_providers)
from .models import classify_pack_models
from .references import list_reference_photos, read_image
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
    if both_onnxruntime_builds_problem():
        say(False, both_onnxruntime_builds_problem())
    gpus = visible_gpus()
    where = "nvidia-smi lists none" if shutil.which("nvidia-smi") else "no nvidia-smi on PATH"
    lines.append(f"GPUs: {', '.join(gpus) if gpus else f'none found ({where})'}")
    pack = local_model_pack(settings.MODEL_ROOT, settings.MODEL_PACK_NAME)
    if pack is None:
        say(False, f"model pack {settings.MODEL_PACK_NAME} not on disk: a run downloads it into "
                   f"{Path(settings.MODEL_ROOT).expanduser() / 'models' / settings.MODEL_PACK_NAME} "
                   f"(needs internet), or put its .onnx files there")
    else:
        try:
            detector, recognizer = classify_pack_models(pack)
            say(True, f"model pack: {pack} (detector {detector.name}, recognizer {recognizer.name})")
            for provider, verdict in working_providers(detector).items():
                if optional_provider(provider, verdict) and settings.PROVIDERS in ("auto", "cpu"):
                    lines.append(f"  [--] provider {provider}: {verdict}")  # optional here
                else:
                    say(verdict == "loads", f"provider {provider}: {verdict}")
        except BadInput as error:
            say(False, str(error))
        except Exception as error:  # a broken install is what --check is for: say it, go on
            say(False, f"the models cannot be opened ({type(error).__name__}: {error}); "
                       f"reinstall: pip install -r requirements.txt")
    ffmpeg = find_ffmpeg(settings.FFMPEG_DIR)
    say(ffmpeg is not None, f"ffmpeg: {ffmpeg or 'not found (clips cannot be cut)'}")
    return lines, problems


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
                  OUTPUT_DIR=str(root / "found_fragments_colored_"))
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
