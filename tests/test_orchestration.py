"""Section 8, Orchestration: the whole search on the shared clips, end to end, in a subprocess."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import MODEL_PACK, MODEL_ROOT, REPO, TEST_THRESHOLD, TESTDATA

GROUND_TRUTH = json.loads((TESTDATA / "ground_truth.json").read_text())
DISTRACTORS = {"Kit_Harington", "Rose_Leslie"}


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


def search_command(videos: Path, refs: Path, output: Path, *extra: str) -> list:
    return [sys.executable, str(REPO / "main.py"), "--videos", str(videos), "--refs", str(refs),
            "--output", str(output), "--model-root", str(MODEL_ROOT), "--model-pack", MODEL_PACK,
            "--custom-threshold", str(TEST_THRESHOLD), "--providers", "cpu",
            "--num-cpu-loaders", "1", "--gpu-worker-threads", "2", "--batch-size", "4",
            "--max-buffer-slots", "12", *extra]


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """One full run on every shared clip with every reference, distractors included."""
    base = tmp_path_factory.mktemp("e2e")
    refs = base / "refs"
    refs.mkdir()
    for sub in ("refs", "refs_distractors"):
        for photo in (TESTDATA / sub).glob("*.jpg"):
            os.symlink(photo, refs / photo.name)
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


def video_entry(search, name: str) -> dict:
    return next(v for v in search["results"]["videos"] if Path(v["file"]).name == name)


def test_the_run_succeeds_and_reports_the_provider(search):
    """Exit code 0, a complete results.json, and the provider in use is printed."""
    done = search["done"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert search["results"]["complete"] is True
    assert "runs on CPUExecutionProvider" in done.stdout, done.stdout[-2000:]


def test_obama_is_found_on_at_least_90_percent_of_processed_frames(search):
    """Barack_Obama is matched on >= 90 % of the processed frames of obama_whcd.mp4."""
    entry = video_entry(search, "obama_whcd.mp4")
    frames = {d["frame"] for d in entry["detections"] if d["name"] == "Barack_Obama"}
    share = len(frames) / entry["processed_frame_count"]
    assert entry["processed_frame_count"] == 60
    assert share >= 0.90, f"found on {len(frames)} of {entry['processed_frame_count']} frames"


def test_lin_manuel_miranda_is_found_in_his_medium_shot(search):
    """Lin_Manuel_Miranda is matched inside 2.736-7.040 s of the Hamilton clip."""
    entry = video_entry(search, "short_hamilton_clip.mp4")
    times = [d["time"] for d in entry["detections"] if d["name"] == "Lin_Manuel_Miranda"]
    inside = [t for t in times if 2.736 <= t <= 7.040]
    assert len(inside) >= 30, f"{len(inside)} sightings inside the shot; all: {times[:20]}..."


def test_no_distractor_and_nobody_in_the_crowd(search):
    """No distractor is named anywhere and nobody is named in the negative-control crowd clip."""
    for entry in search["results"]["videos"]:
        named = {d["name"] for d in entry["detections"]}
        assert not named & DISTRACTORS, f"{entry['file']}: distractors {named & DISTRACTORS}"
    crowd = video_entry(search, "crowd_royal_opera_house.mp4")
    assert crowd["detections"] == [] and crowd["ranges"] == [], crowd["ranges"]


def test_every_named_frame_shows_that_person(search):
    """Every detection lies within 0.1 s of the person's ground-truth ranges (frame precision 1.0)."""
    for entry in search["results"]["videos"]:
        truth = GROUND_TRUTH[Path(entry["file"]).name]
        wrong = [(d["name"], d["time"]) for d in entry["detections"]
                 if not any(a - 0.1 <= d["time"] <= b + 0.1 for a, b in truth.get(d["name"], []))]
        assert not wrong, f"{entry['file']}: named where absent: {wrong[:10]}"


def test_reports_list_both_distance_and_similarity(search):
    """Detections and ranges carry distance and similarity = 1 - distance; CSV has a row per range."""
    ranges = [r for v in search["results"]["videos"] for r in v["ranges"]]
    assert ranges, "nothing found at all"
    for entry in search["results"]["videos"]:
        for d in entry["detections"]:
            assert d["similarity"] == pytest.approx(1 - d["distance"], abs=1e-3), d
            assert {"frame", "time", "name", "distance", "similarity", "bbox", "det_score"} <= set(d)
    rows = (search["out"] / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(ranges), rows


def test_snapshots_show_recognised_frames_of_every_named_track(search):
    """Every named face track has a snapshot, each at a frame where that person was recognised."""
    for entry in search["results"]["videos"]:
        folder = search["out"] / entry["output_folder"]
        recognised = {(d["frame"], d["name"]) for d in entry["detections"] if d["recognized"]}
        shots = {(int(p.name.split("_")[1]), p.stem.split("s_", 1)[1]) for p in folder.glob("frame_*.jpg")}
        assert shots <= recognised, f"{entry['file']}: snapshots of unrecognised frames {shots - recognised}"
        tracks = {(d["track"], d["name"]) for d in entry["detections"]}
        shot_tracks = {(d["track"], d["name"]) for d in entry["detections"]
                       if (d["frame"], d["name"]) in shots}
        assert shot_tracks == tracks, f"{entry['file']}: tracks without a snapshot {tracks - shot_tracks}"


def ffprobe_streams(path: Path) -> list:
    done = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type",
                           "-of", "json", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"ffprobe cannot read {path}: {done.stderr}"
    return [s["codec_type"] for s in json.loads(done.stdout)["streams"]]


def source_frames(path: str) -> list:
    import av
    with av.open(path) as container:
        stream = container.streams.video[0]
        return [(float((f.pts - stream.start_time) * stream.time_base),
                 f.to_ndarray(format="bgr24").astype(np.int16)) for f in container.decode(stream)]


def first_clip_frame(path: Path) -> np.ndarray:
    import av
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="bgr24").astype(np.int16)


def test_every_clip_plays_with_audio_and_starts_within_one_frame(search):
    """Each clip has video and audio (ffprobe) and its first frame is the range's start frame (+-1)."""
    checked = 0
    for entry in search["results"]["videos"]:
        if not entry["ranges"]:
            continue
        frames = source_frames(entry["file"])
        for r in entry["ranges"]:
            clip = search["out"] / r["clip"]
            assert clip.is_file() and not clip.with_name(clip.name + ".part").exists()
            assert sorted(ffprobe_streams(clip)) == ["audio", "video"], clip
            first = first_clip_frame(clip)
            errors = [np.abs(first - image).mean() for _, image in frames]
            shown = int(np.argmin(errors))
            expected = next(i for i, (t, _) in enumerate(frames) if t >= r["start"] - 1e-3)
            assert abs(shown - expected) <= 1, f"{clip.name}: starts at frame {shown}, not {expected}"
            checked += 1
    assert checked >= 3, f"only {checked} clips"


def test_no_orphan_processes_and_no_shared_memory_left(search):
    """After the run no child process is alive and no /dev/shm/sfv* block was left behind."""
    assert processes_with_marker(search["marker"]) == []
    assert search["ring"] not in shm_names(), f"/dev/shm/{search['ring']} was left behind"


def start_search(tmp_path: Path, refs: Path, marker: str) -> tuple:
    """Start a search in the background; return (process, output lines up to the worker's start)."""
    env = {**os.environ, marker: "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(search_command(TESTDATA / "videos", refs, tmp_path / "out"), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=tmp_path)
    output = []
    for line in process.stdout:  # wait until the worker has loaded its models
        output.append(line)
        if "worker-0:" in line:
            break
    time.sleep(2)
    return process, output


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


@pytest.mark.parametrize("how", ["kill -9 worker", "Ctrl-C", "SIGTERM"])
def test_a_killed_worker_or_ctrl_c_stops_the_run_cleanly(tmp_path, all_refs_dir, how):
    """A worker killed mid-run, or Ctrl-C: the run stops within seconds, saves what it has marked
    incomplete, exits non-zero (1, or 130 for Ctrl-C), and leaves no process or shared memory."""
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    process, output = start_search(tmp_path, all_refs_dir, marker)
    if how == "Ctrl-C":
        os.kill(process.pid, signal.SIGINT)
    elif how == "SIGTERM":
        os.kill(process.pid, signal.SIGTERM)
    else:
        os.kill(worker_pid(process.pid, marker), signal.SIGKILL)
    rest, _ = process.communicate(timeout=120)  # a hang fails here
    text = "".join(output) + rest
    if how in ("Ctrl-C", "SIGTERM"):  # SIGTERM (kill, a service manager) stops like Ctrl-C
        assert process.returncode == 130 and "interrupted" in text, text[-3000:]
    else:
        assert process.returncode == 1, text[-3000:]
        assert "pipeline broken: worker-0" in text, text[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["complete"] is False
    time.sleep(0.5)
    assert processes_with_marker(marker) == [], "child processes outlived the run"
    assert f"sfv{process.pid}r" not in shm_names(), "shared memory left behind"


def test_debug_outputs_show_raw_detections_and_every_recognition(tmp_path, all_refs_dir):
    """debug_det saves each processed frame with its raw detections; debug_rec logs each
    recognition's distance to every person, to the console and to debug_rec.tsv."""
    videos = tmp_path / "videos"
    videos.mkdir()
    os.symlink(TESTDATA / "videos" / "obama_whcd.mp4", videos / "obama_whcd.mp4")
    out, debug_dir = tmp_path / "out", tmp_path / "dbg"
    cmd = search_command(videos, all_refs_dir, out, "--frame-interval", "6", "--debug-det",
                         "--debug-det-dir", str(debug_dir), "--debug-rec")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    frames = sorted(p.name for p in (debug_dir / "obama_whcd").glob("frame_*.jpg"))
    assert frames == [f"frame_{i:07d}.jpg" for i in range(0, 60, 6)], frames
    lines = (out / "debug_rec.tsv").read_text().splitlines()
    assert lines, "no recognition logged"
    for line in lines:
        fields = line.split("\t")
        people = dict(f.split("=") for f in fields[5:])
        assert set(people) == {p.stem for p in all_refs_dir.glob("*.jpg")}, line
        assert fields[4] in ("Barack_Obama", "-"), line
    assert "[debug_rec]" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["videos"][0]["processed_frame_count"] == 10


def screenshot(page: Path, png: Path, height: int = 2400) -> np.ndarray:
    """Render a page in headless Chromium (Debian's) and return the screenshot (BGR)."""
    import cv2
    import shutil
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "Chromium is needed to check the report: apt-get install chromium (.ci/run does)"
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={png.parent / 'chromium-profile'}", "--hide-scrollbars",
         f"--window-size=1280,{height}", f"--screenshot={png}", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"no screenshot: {done.stderr[-2000:]}"
    return cv2.imread(str(png))


def colour_pixels(image: np.ndarray, hex_colour: str) -> int:
    """Count the pixels of exactly this #rrggbb colour."""
    red, green, blue = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return int(np.all(image == (blue, green, red), axis=2).sum())


def test_html_report_renders_timelines_in_a_browser(search, tmp_path, main_module):
    """index.html is self-contained (no http) and, in a real browser, shows a timeline bar in each
    found person's colour (none for people not found), and 'nobody found' for the crowd clip."""
    page = search["out"] / "index.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text, "the report must work offline"
    assert "nobody found" in text
    image = screenshot(page, tmp_path / "report.png")
    people = [p["name"] for p in search["results"]["people"]]
    found = {r["name"] for v in search["results"]["videos"] for r in v["ranges"]}
    assert found >= {"Barack_Obama", "Lin_Manuel_Miranda"}, found
    bar_width_px = 1280 - 2 * 24 - 2 * 14 - 190  # page margin, card padding, label column
    for name in people:
        pixels = colour_pixels(image, main_module.color_hex(people.index(name)))
        if name in found:  # a bar 20 px high over at least a fifth of the timeline width
            assert pixels > 20 * 0.2 * bar_width_px, f"{name}: only {pixels} pixels of its colour"
        else:
            assert pixels < 400, f"{name} was not found but its colour covers {pixels} pixels"


def test_children_exit_and_free_the_ring_when_the_parent_is_killed(tmp_path, all_refs_dir):
    """kill -9 of the main process (nobody left to stop the children): decoders and workers notice
    their parent is gone, exit, and the ring's shared memory is released; nothing is orphaned."""
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    process, _ = start_search(tmp_path, all_refs_dir, marker)
    ring = f"sfv{process.pid}r"
    assert ring in shm_names(), "the run's ring buffer should exist while it runs"
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    deadline = time.monotonic() + 60  # a bound for the wait, not a timing requirement
    while processes_with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_with_marker(marker) == [], "children outlived their killed parent"
    assert ring not in shm_names(), f"/dev/shm/{ring} was left behind"


def test_a_worker_that_fails_reports_its_traceback_and_the_run_stops(tmp_path, all_refs_dir):
    """An exception inside a worker (here: debug_det_dir is a file, so saving fails) stops the run
    with exit code 1, names the worker and prints its traceback; results are saved incomplete."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the debug folder should be")
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    env = {**os.environ, marker: "1"}
    cmd = search_command(TESTDATA / "videos", all_refs_dir, tmp_path / "out", "--debug-det",
                         "--debug-det-dir", str(blocker))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "pipeline broken: worker-0" in done.stderr and "Traceback" in done.stderr, done.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["complete"] is False
    time.sleep(0.5)
    assert processes_with_marker(marker) == []


def test_frames_on_device_names_the_same_frames_as_the_cpu_path(search, tmp_path, all_refs_dir):
    """FRAMES_ON_DEVICE on (here the 'device' is the CPU: the same graphs, IO binding and batched
    detector a GPU runs) names Barack_Obama on the same frames of obama_whcd.mp4 as the default
    CPU path, with distances within 0.02 (the int8 recognizer moves by ~0.01 for a pixel one grey
    level off: see test_device_looks_embed_like_the_cpu_path), and says that frames go to the
    device once."""
    videos = tmp_path / "videos"
    videos.mkdir()
    os.symlink(TESTDATA / "videos" / "obama_whcd.mp4", videos / "obama_whcd.mp4")
    cmd = search_command(videos, all_refs_dir, tmp_path / "out", "--frames-on-device", "on",
                         "--trt-cache-dir", str(tmp_path / "cache"))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "frames go to the CPU once" in done.stdout, done.stdout[-2000:]
    device = json.loads((tmp_path / "out" / "results.json").read_text())["videos"][0]
    default = video_entry(search, "obama_whcd.mp4")
    by_frame = {(d["frame"], d["name"]): d["distance"] for d in default["detections"]}
    got = {(d["frame"], d["name"]): d["distance"] for d in device["detections"]}
    assert set(got) == set(by_frame), f"only device {set(got) - set(by_frame)}, only CPU {set(by_frame) - set(got)}"
    worst = max(abs(got[k] - by_frame[k]) for k in got)
    assert worst <= 0.02, f"distances differ by up to {worst:.4f}"
