"""Shared fixtures: the real test media and models in ../shared, read in place (never copied)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TESTDATA = SHARED / "testdata"
MODEL_ROOT = SHARED  # insightface layout: <root>/models/<pack>/
MODEL_PACK = "buffalo_sc_int8"
TEST_THRESHOLD = 0.70  # cosine distance fitting buffalo_sc_int8 (same person ~0.5-0.6, others >= 0.74)
VIDEOS = sorted((TESTDATA / "videos").glob("*.mp4"))

sys.path.insert(0, str(REPO))  # the package beside main.py, for the imports below

from findpeople.decode import VideoInfo, decode_frames, probe_video  # noqa: E402
from findpeople.detect import detect_faces  # noqa: E402
from findpeople.models import load_face_models  # noqa: E402
from findpeople.references import read_image  # noqa: E402
from findpeople.clips import TimeRange, find_ffmpeg  # noqa: E402


def pytest_configure(config):
    if not TESTDATA.is_dir():
        raise pytest.UsageError(f"{TESTDATA} is missing: the tests read ../shared beside the checkout")


@pytest.fixture(scope="session")
def main_module():
    """The main module, imported once (importing it does nothing)."""
    import main
    return main


@pytest.fixture(scope="session")
def ffmpeg_exe(main_module):
    """The ffmpeg main.py would use (ffmpeg/ -> PATH -> imageio-ffmpeg)."""
    exe = find_ffmpeg(str(REPO / "ffmpeg"))
    assert exe, "no ffmpeg found: pip install imageio-ffmpeg"
    return exe


@pytest.fixture(scope="session")
def test_settings(main_module):
    """Settings for the shared models on the CPU, as a Settings record."""
    return main_module.load_settings([
        "--model-root", str(MODEL_ROOT), "--model-pack", MODEL_PACK, "--providers", "cpu",
        "--custom-threshold", str(TEST_THRESHOLD)])


@pytest.fixture(scope="session")
def cpu_models(main_module, test_settings):
    """The buffalo_sc_int8 detector and recognizer on the CPU provider."""
    return load_face_models(test_settings, "cpu", 1)


def link_all_refs(folder: Path) -> Path:
    """Make folder hold links to every photo in refs/ and refs_distractors/ (the files stay in place)."""
    folder.mkdir(parents=True)
    for sub in ("refs", "refs_distractors"):
        for photo in (TESTDATA / sub).glob("*.jpg"):
            os.symlink(photo, folder / photo.name)
    return folder


@pytest.fixture()
def all_refs_dir(tmp_path):
    """A folder of links to every photo in refs/ and refs_distractors/."""
    return link_all_refs(tmp_path / "refs")


PACK_DIR = MODEL_ROOT / "models" / MODEL_PACK


DETECTORS = [PACK_DIR / "det_500m.onnx", SHARED / "models" / "extra" / "scrfd_2.5g_kps_640.onnx"]


def sample_images(main_module) -> list:
    """Reference photos plus a few frames of each shared video (BGR)."""
    images = [read_image(p) for p in sorted((TESTDATA / "refs").glob("*.jpg"))]
    for path in VIDEOS:
        info = probe_video(path, 0, path.stem)
        images += [img for i, _, img in decode_frames(info, 37)][:3]
    return images


@pytest.fixture(scope="session")
def images(main_module):
    return sample_images(main_module)


def pack_with(tmp_path: Path, detector: Path) -> Path:
    """A model root whose pack links the given detector and the shared recognizer."""
    pack = tmp_path / "models" / "testpack"
    pack.mkdir(parents=True)
    os.symlink(detector, pack / detector.name)
    os.symlink(PACK_DIR / "w600k_mbf_int8.onnx", pack / "w600k_mbf_int8.onnx")
    return tmp_path


def assert_same_faces(found: tuple, reference: tuple, px: float, score: float, what: str) -> None:
    """Assert two (boxes, kps) detections hold the same faces: boxes and keypoints within px,
    scores within score."""
    assert len(found[0]) == len(reference[0]), f"{what}: {len(found[0])} vs {len(reference[0])} faces"
    if len(reference[0]):
        assert np.abs(found[0][:, :4] - reference[0][:, :4]).max() <= px, f"{what}: boxes"
        assert np.abs(found[0][:, 4] - reference[0][:, 4]).max() <= score, f"{what}: scores"
        assert np.abs(found[1] - reference[1]).max() <= px, f"{what}: keypoints"


@pytest.fixture(scope="session")
def faces(main_module, images, cpu_models, test_settings) -> list:
    """(image, kps [F,5,2]) for every sample image with at least one face."""
    found = [(image, detect_faces(cpu_models, [image], test_settings)[0][1])
             for image in images]
    return [(image, kps) for image, kps in found if len(kps)]


@pytest.fixture(scope="session")
def device_models(main_module, tmp_path_factory):
    """(settings, models) with FRAMES_ON_DEVICE on, on the CPU: the device path's graphs, IO
    binding and batched detector, exactly as on a GPU but with 'cpu' as the device."""
    cache = tmp_path_factory.mktemp("cache")
    settings = main_module.load_settings([
        "--model-root", str(MODEL_ROOT), "--model-pack", MODEL_PACK, "--providers", "cpu",
        "--frames-on-device", "on", "--batch-size", "4", "--trt-cache-dir", str(cache)])
    said = []
    models = load_face_models(settings, "cpu", 1, say=said.append)
    assert models.device is not None and models.det_batched, said
    assert any("frames go to the CPU once" in line for line in said), said
    return settings, models


def make_info(main_module, idx=0, path="/videos/obama_whcd.mp4", output_name="obama_whcd"):
    """Return a VideoInfo built directly (4 s at 15 fps)."""
    return VideoInfo(
        idx=idx, path=path, output_name=output_name, width=844, height=614, fps=15.0,
        frame_count=60, duration_s=4.0, time_base=Fraction(1, 15360), origin_pts=0,
        video_start_offset_s=0.0, has_audio=True)


def make_range(main_module, name, start_s, end_s, distance):
    """Return a TimeRange whose sightings are one second inside its ends."""
    return TimeRange(name, start_s, end_s, distance, start_s + 1.0, end_s - 1.0)


def processes_with_marker(marker: str) -> list:
    """PIDs of live processes whose environment carries the marker (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def shm_names() -> set:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("sfv")}


def answers(results: dict) -> list:
    """Return what a run found, per video: its ranges (name, times, best distance) and every
    sighting (frame, time, name, distance, box, track), without clip paths or timings."""
    found = []
    for video in results["videos"]:
        ranges = [{k: r[k] for k in ("name", "start", "end", "first_sighting", "last_sighting",
                                     "best_distance")} for r in video["ranges"]]
        sightings = [{k: d[k] for k in ("frame", "time", "name", "distance", "bbox", "track",
                                        "recognized")} for d in video["detections"]]
        found.append({"file": Path(video["file"]).name, "status": video["status"],
                      "ranges": ranges, "detections": sightings})
    return found


def search_command(videos: Path, refs: Path, output: Path, *extra: str, index: Path | None = None) -> list:
    """Return the command of a CPU run of main.py; its index goes in index, by default beside
    the output folder (<output>_index), so that runs with the same output folder share it."""
    index = index or output.with_name(output.name + "_index")
    return [sys.executable, str(REPO / "main.py"), "--videos", str(videos), "--refs", str(refs),
            "--output", str(output), "--index-dir", str(index),
            "--model-root", str(MODEL_ROOT), "--model-pack", MODEL_PACK,
            "--custom-threshold", str(TEST_THRESHOLD), "--providers", "cpu",
            "--num-cpu-loaders", "1", "--gpu-worker-threads", "2", "--batch-size", "4",
            "--max-buffer-slots", "12", *extra]


@pytest.fixture(scope="session")
def search(tmp_path_factory):
    """One full run on every shared clip with every reference, distractors included."""
    base = tmp_path_factory.mktemp("e2e")
    refs = link_all_refs(base / "refs")
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    env = {**os.environ, marker: "1", "PYTHONUNBUFFERED": "1"}
    cmd = search_command(TESTDATA / "videos", refs, base / "out")
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=base) as process:
        stdout, stderr = process.communicate(timeout=900)
    done = subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)
    time.sleep(0.5)
    return {"done": done, "out": base / "out", "marker": marker, "ring": f"sfv{process.pid}r",
            "results": json.loads((base / "out" / "results.json").read_text())}


def worker_pid(parent_pid: int, marker: str) -> int:
    """The PID of the run's worker: the child that loaded onnxruntime (decoders never do)."""
    for pid in processes_with_marker(marker):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            if f"PPid:\t{parent_pid}\n" in status and "onnxruntime" in Path(f"/proc/{pid}/maps").read_text():
                return pid
        except OSError:
            continue
    raise AssertionError(f"no worker process among {processes_with_marker(marker)}")


def start_logged(cmd: list, cwd: Path, env: dict) -> tuple:
    """Start main.py in its own session (as a terminal does) with a thread collecting its output;
    return (process, collected lines, that thread)."""
    process = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines = []

    def collect():
        for line in process.stdout:
            lines.append(line)
    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    return process, lines, reader


# Faults, interruption and resume (issue #5) ---------------------------------------------------
def video_folder(base: Path, *names: str) -> Path:
    """A folder of links to some of the shared clips (the files stay in place)."""
    folder = base / "videos"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.symlink(TESTDATA / "videos" / name, folder / name)
    return folder


def run_main(cmd: list, cwd: Path, env: dict | None = None, timeout: int = 600) -> tuple:
    """Run main.py to the end; return (exit code, stdout + stderr)."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return done.returncode, done.stdout + done.stderr


def make_video(ffmpeg_exe: str, path: Path, size: str, *codec: str, seconds: float = 3,
               audio: bool = True) -> Path:
    """Write a test video with ffmpeg: its test pattern (a moving picture with a frame counter) at
    size ('WxH') and 25 fps, with a 440 Hz tone unless audio is False, encoded with the codec
    arguments given; return its path."""
    tone = ["-f", "lavfi", "-i", "sine=frequency=440"] if audio else []
    done = subprocess.run([ffmpeg_exe, "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                           f"testsrc=size={size}:rate=25", *tone, "-t", str(seconds), *codec,
                           str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"ffmpeg could not make {path.name}: {done.stderr[-2000:]}"
    return path
