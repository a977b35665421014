"""GPU check: which execution providers really load, whether TensorRT engines are built once and
then reused, and how fast the detector runs at batch 1 / 8 / 32 (and the recognizer per face).

    bash bench/gpu_check.sh                      # models from ../shared (the test pack)
    bash bench/gpu_check.sh --model-root ~/.insightface --model-pack buffalo_l
    bash bench/gpu_check.sh --quick              # fewer timed repeats

On a GPU machine, install first, the documented way (docs/gpu.md):
python3 -m venv .venv && .venv/bin/python install_gpu.py

It runs anywhere: on a machine without a GPU, onnxruntime-gpu, TensorRT or ffmpeg it says what it
could not check ("[--]" lines) and measures what it can (the CPU at least). Exit code 0 unless a
check that could run failed ("[!!]": a provider listed but not loading, an engine rebuilt on the
second run, batched detections different from single ones).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# ──────────────────────────────────────────────────────────────────────────────────────────────
# SETTINGS
# ──────────────────────────────────────────────────────────────────────────────────────────────
REPO = Path(__file__).resolve().parents[1]
MODEL_ROOT = REPO.parent / "shared"  # holds models/<pack>/ (or pass --model-root)
MODEL_PACK = "buffalo_sc_int8"
BATCHES = (1, 8, 32)  # detector batch sizes timed
DET_SIZE = 640  # px, both sides of the detector input
FRAME_HW = (1080, 1920)  # synthetic frames (a 1080p video), letterboxed to 640x384
TIMED_RUNS = 20  # per batch size (--quick: 5), after WARMUP_RUNS untimed
WARMUP_RUNS = 3
REC_CHUNKS = (1, 8, 32)  # recognizer faces per call timed
# ──────────────────────────────────────────────────────────────────────────────────────────────

sys.path.insert(0, str(REPO))
import main  # noqa: E402  (importing main does nothing)
from findpeople.decode import decode_frames, probe_video  # noqa: E402
from findpeople.gpulibs import library_lines, load_nvidia_libraries  # noqa: E402
from findpeople.providers import (
    both_onnxruntime_builds_problem, gpu_slots, onnxruntime_gpu_build, optional_provider,
    package_version, provider_library, tensorrt_version, visible_gpus, working_providers)  # noqa: E402
from findpeople.detect import detect_faces, detector_input_size, embed_faces, letterbox  # noqa: E402
from findpeople.device import detect_on_device  # noqa: E402
from findpeople.models import classify_pack_models, load_face_models  # noqa: E402
from findpeople.doctor import local_model_pack  # noqa: E402


class Report:
    """Lines of [ok] / [--] (could not check) / [!!] (failed) and their counts."""

    def __init__(self):
        self.failed, self.unchecked = 0, []

    def line(self, mark: str, text: str) -> None:
        """Print one result line; count failures and what could not be checked."""
        print(f"  [{mark}] {text}", flush=True)
        self.failed += mark == "!!"
        if mark == "--":
            self.unchecked.append(text)


def run_settings(model_root: str, pack: str, cache_dir: Path, providers: str, batch: int):
    """Return the Settings for this check (batched detector, the given providers and cache)."""
    return main.load_settings(["--model-root", model_root, "--model-pack", pack,
                               "--providers", providers, "--frames-on-device", "on",
                               "--batch-size", str(batch), "--rec-chunk-size", str(max(REC_CHUNKS)),
                               "--det-size", str(DET_SIZE), "--trt-cache-dir", str(cache_dir)])


def environment(report: Report) -> None:
    """Report Python, packages, GPUs, TensorRT and ffmpeg."""
    import onnxruntime as ort
    print(f"Python {platform.python_version()} on {platform.system()} {platform.machine()}")
    for name in ("onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "opencv-python",
                 "opencv-python-headless", "insightface", "av", "tensorrt", "tensorrt-cu13-libs",
                 "tensorrt-cu12-libs"):
        print(f"  {name}: {package_version(name) or 'not installed'}")
    print(f"  onnxruntime providers: {', '.join(ort.get_available_providers())}")
    both = both_onnxruntime_builds_problem()
    if both:
        report.line("!!", both)
    libraries(report)
    gpus = visible_gpus()
    report.line("ok" if gpus else "--", f"GPUs: {', '.join(gpus) or 'none (no nvidia-smi or no GPU)'}")
    trt = tensorrt_version()
    report.line("ok" if trt else "--", f"TensorRT: {trt or 'not installed (engine cache not checked)'}")
    ffmpeg = shutil.which("ffmpeg")
    report.line("ok" if ffmpeg else "--", f"ffmpeg on PATH: {ffmpeg or 'none (clip cutting not checked here)'}")
    for module in ("insightface", "av", "cv2"):
        try:
            __import__(module)
        except ImportError as error:
            report.line("--", f"{module} cannot be imported ({error}): main.py's full run not possible here")


def libraries(report: Report) -> None:
    """Report each CUDA, cuBLAS, cuDNN and TensorRT library the onnxruntime-gpu build links: its
    version, from pip or the system, or not found ([--]); nothing for the CPU build."""
    library = provider_library("TensorrtExecutionProvider")
    if not package_version("onnxruntime-gpu") or not library.is_file():
        return
    load_nvidia_libraries(["CUDAExecutionProvider", "TensorrtExecutionProvider"])
    print(f"  NVIDIA libraries ({onnxruntime_gpu_build()}):")
    for found, text in library_lines(library):
        report.line("ok" if found else "--", text)


def providers(report: Report, detector: Path) -> list:
    """Report each provider opened alone on the detector; return those that load, best first."""
    working = []
    for provider, verdict in working_providers(detector).items():
        if verdict == "loads":
            working.append(provider)
            report.line("ok", f"{provider}: loads")
        elif optional_provider(provider, verdict):
            report.line("--", f"{provider}: {verdict}")
        else:
            report.line("!!", f"{provider}: {verdict}")
    return working


def open_detector_once(model_root: str, pack: str, cache_dir: Path, provider: str) -> dict:
    """Open the (batched) detector as a worker would; return seconds, provider and notes."""
    settings = run_settings(model_root, pack, cache_dir, provider, max(BATCHES))
    notes = []
    started = time.perf_counter()
    models = load_face_models(settings, provider, 4, gpu_slots(settings, 1)[0]
                                   if provider != "cpu" else None, notes.append)
    return {"seconds": round(time.perf_counter() - started, 2), "notes": notes,
            "providers": models.providers, "batched": models.det_batched}


def engine_files(cache_dir: Path) -> dict:
    """Return {engine or profile file: (bytes, mtime ns)} under the TensorRT cache."""
    return {str(p.relative_to(cache_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in cache_dir.rglob("*") if p.suffix in (".engine", ".profile")}


def engines(report: Report, model_root: str, pack: str, cache_dir: Path, working: list) -> dict:
    """With TensorRT: open the models in two fresh processes; the first builds the engines, the
    second must load them unchanged (same files, sizes and times; no WARMUP). Return the files."""
    if "TensorrtExecutionProvider" not in working:
        report.line("--", "TensorRT engine build and reuse: TensorRT does not load here")
        return {}
    runs = []
    for attempt in ("first", "second"):
        done = subprocess.run([sys.executable, __file__, "--open-once", "--model-root", model_root,
                               "--model-pack", pack, "--cache", str(cache_dir)],
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            report.line("!!", f"TensorRT {attempt} run failed: {done.stderr.strip()[-800:]}")
            return {}
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        runs[-1]["engines"] = engine_files(cache_dir)
        print(f"    {attempt} run: {runs[-1]['seconds']} s, {len(runs[-1]['engines'])} engine/profile "
              f"files, notes: {runs[-1]['notes']}")
    warmup_again = any("WARMUP" in note for note in runs[1]["notes"])
    rebuilt = runs[1]["engines"] != runs[0]["engines"] or warmup_again
    report.line("!!" if rebuilt or not runs[0]["engines"] else "ok",
                f"TensorRT engines: built in {runs[0]['seconds']} s, reopened in {runs[1]['seconds']} s "
                f"({runs[0]['seconds'] / max(runs[1]['seconds'], 0.01):.1f}x faster), "
                f"{'REBUILT on the second run' if rebuilt else 'reused unchanged'}")
    return runs[1]["engines"]


def decode_speed() -> None:
    """Print how fast PyAV decodes the shared 1080p clip on this machine (what the GPU path must
    keep up with), or say why it cannot."""
    clip = REPO.parent / "shared" / "testdata" / "videos" / "crowd_royal_opera_house.mp4"
    try:
        info = probe_video(clip, 0, clip.stem)
        started = time.perf_counter()
        count = sum(1 for _ in decode_frames(info, 1))
        print(f"    PyAV decoding of {clip.name} (1920x1080, one process): "
              f"{count / (time.perf_counter() - started):.1f} frames/s")
    except Exception as error:  # no PyAV or no test data: say so, measure the rest
        print(f"    decoding speed not measured: {type(error).__name__}: {error}")


def test_frames(count: int) -> list:
    """Return `count` 1080p BGR frames: the shared reference photos (real faces) pasted on a grey
    canvas when ../shared/testdata is there, else noise blobs (speed does not depend on content)."""
    import cv2
    photos = sorted((REPO.parent / "shared" / "testdata" / "refs").glob("*.jpg"))
    rng = np.random.default_rng(1)
    frames = []
    for i in range(count):
        frame = np.full((*FRAME_HW, 3), 90, np.uint8)
        if photos:
            photo = cv2.imread(str(photos[i % len(photos)]))
            scale = FRAME_HW[0] * (0.3 + 0.1 * (i % 5)) / photo.shape[0]
            small = cv2.resize(photo, None, fx=scale, fy=scale)
            frame[:small.shape[0], :small.shape[1]] = small[:FRAME_HW[0], :FRAME_HW[1]]
        else:
            frame[::] = np.repeat(np.repeat(rng.integers(0, 255, (135, 240, 3), np.uint8), 8, 0), 8, 1)
        frames.append(frame)
    return frames


def time_runs(run, runs: int) -> float:
    """Return the median seconds of run() over `runs` calls, after WARMUP_RUNS untimed ones."""
    for _ in range(WARMUP_RUNS):
        run()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def detector_speed(models, settings, frames: list, runs: int) -> None:
    """Print frames/s per batch size: the model alone (blob ready), the CPU path (cv2 letterbox,
    model, decoding) and, with frames on the device, the device path (upload, graph, model)."""
    size = detector_input_size(models, settings, FRAME_HW)
    blob = np.concatenate([letterbox(f, size)[0] for f in frames])
    for batch in BATCHES if models.det_batched else (1,):
        feed = {models.det_input_name: blob[:batch]}
        model_s = time_runs(lambda: models.det_session.run(models.det_output_names, feed), runs)
        cpu_s = time_runs(lambda: detect_faces(models, frames[:batch], settings), max(2, runs // 4))
        line = (f"      batch {batch:>2}: model {batch / model_s:8.1f} frames/s, CPU path "
                f"{batch / cpu_s:8.1f} frames/s")
        if models.device is not None:
            dev_s = time_runs(lambda: detect_on_device(models, frames[:batch], settings), max(2, runs // 4))
            line += f", device path {batch / dev_s:8.1f} frames/s ({cpu_s / dev_s:.2f}x the CPU path)"
        print(line, flush=True)


def detections_agree(report: Report, provider: str, models, settings, frames: list) -> None:
    """Check that batched detections (and the device path's) equal single-frame CPU-path ones."""
    single_settings = main.load_settings([*settings_flags(settings), "--batch-size", "1"])
    single = [detect_faces(models, [f], single_settings)[0] for f in frames[:8]]
    paths = {"batched": detect_faces(models, frames[:8], settings)}
    if models.device is not None:
        paths["device path"] = detect_on_device(models, frames[:8], settings)[0]
    faces = sum(len(boxes) for boxes, _ in single)
    for name, found in paths.items():
        same = all(len(a[0]) == len(b[0]) and np.abs(a[0][:, :4] - b[0][:, :4]).max(initial=0) <= 1.0
                   for a, b in zip(single, found))
        report.line("ok" if same else "!!", f"{provider}: {name} detections equal single-frame ones "
                                            f"({faces} faces in 8 frames)")


def settings_flags(settings) -> list:
    """Return the flags that rebuild these settings."""
    return ["--model-root", settings.MODEL_ROOT, "--model-pack", settings.MODEL_PACK_NAME,
            "--providers", settings.PROVIDERS, "--frames-on-device", settings.FRAMES_ON_DEVICE,
            "--det-size", str(DET_SIZE), "--trt-cache-dir", settings.TRT_CACHE_DIR]


def speed(report: Report, model_root: str, pack: str, cache_dir: Path, provider: str,
          runs: int) -> None:
    """Print detector frames/s at each batch size and recognizer faces/s on one provider; check
    that batched and device-path detections equal single-frame ones."""
    choice = {"TensorrtExecutionProvider": "tensorrt", "CUDAExecutionProvider": "cuda"}.get(provider, "cpu")
    settings = run_settings(model_root, pack, cache_dir, choice, max(BATCHES))
    gpu = gpu_slots(settings, 1)[0] if choice != "cpu" else None
    models = load_face_models(settings, choice, 4, gpu, lambda text: None)
    frames = test_frames(max(BATCHES))
    print(f"    {provider}: detector {Path(models.det_file).name} on "
          f"{models.providers[Path(models.det_path).name][0]}, recognizer on "
          f"{models.providers[Path(models.rec_path).name][0]}, frames on device: "
          f"{models.device.device_type if models.device else 'no'}", flush=True)
    detector_speed(models, settings, frames, runs)
    detections_agree(report, provider, models, settings, frames)
    crops = [np.zeros((112, 112, 3), np.uint8) + i for i in range(max(REC_CHUNKS))]
    for chunk in REC_CHUNKS:
        seconds = time_runs(lambda: embed_faces(models, crops[:chunk], chunk), max(2, runs // 4))
        print(f"      recognizer, {chunk:>2} faces per call: {chunk / seconds:8.1f} faces/s"
              f"{' (int8: one face per call)' if models.rec_max_chunk == 1 else ''}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    """Return the command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-root", default=str(MODEL_ROOT))
    parser.add_argument("--model-pack", default=MODEL_PACK)
    parser.add_argument("--cache", default="", help="TensorRT cache folder (default: a new temporary one)")
    parser.add_argument("--quick", action="store_true", help="fewer timed runs")
    parser.add_argument("--open-once", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main_check(argv=None) -> int:
    """Run every check; return 1 if one that could run failed, else 0."""
    args = parse_args(argv)
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # GPUs numbered like nvidia-smi
    cache_dir = Path(args.cache or tempfile.mkdtemp(prefix="gpu-check-trt-"))
    if args.open_once:
        print(json.dumps(open_detector_once(args.model_root, args.model_pack, cache_dir, "tensorrt")))
        return 0
    report = Report()
    print("== environment")
    environment(report)
    pack = local_model_pack(args.model_root, args.model_pack)
    if pack is None:
        report.line("!!", f"model pack {args.model_pack} not found under {args.model_root} "
                          f"(pass --model-root/--model-pack)")
        return 1
    detector, _ = classify_pack_models(pack)
    print(f"== providers (each alone on {detector.name})")
    working = providers(report, detector)
    print(f"== TensorRT engine cache ({cache_dir})")
    built = engines(report, args.model_root, args.model_pack, cache_dir, working)
    print("== speed (1080p frames)")
    decode_speed()
    for provider in working:
        speed(report, args.model_root, args.model_pack, cache_dir, provider,
              5 if args.quick else TIMED_RUNS)
    if built and engine_files(cache_dir) != built:
        report.line("!!", "TensorRT engines were rebuilt while measuring (a shape outside the profile?)")
    print(f"== {report.failed} failed, {len(report.unchecked)} not checked here")
    for text in report.unchecked:
        print(f"  not checked: {text}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main_check())
