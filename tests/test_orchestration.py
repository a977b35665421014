"""Section 8, Orchestration: the whole search on the shared clips, end to end, in a subprocess."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import MODEL_PACK, MODEL_ROOT, REPO, TEST_THRESHOLD, TESTDATA, link_all_refs, VIDEOS

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


PROGRESS = re.compile(r"\|\s*[1-9]\d*/\d+ \[[^\]]*frame/s")  # the frames bar, past its first frame


def start_search(tmp_path: Path, refs: Path, marker: str, new_session: bool = False) -> tuple:
    """Start a search in the background (in its own session, as a terminal starts it, when
    new_session); return (process, output lines up to the first processed frames, as the
    progress bar shows them: then the decoder and the worker are both at work)."""
    env = {**os.environ, marker: "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(search_command(TESTDATA / "videos", refs, tmp_path / "out"), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=tmp_path, start_new_session=new_session)
    output = []
    for line in process.stdout:  # text mode: each '\r' of the progress bar ends a line too
        output.append(line)
        if PROGRESS.search(line):
            break
    assert output and PROGRESS.search(output[-1]), "".join(output)[-3000:]
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


@pytest.mark.parametrize("how", ["kill -9 worker", "Ctrl-C", "Ctrl-C to the process group", "SIGTERM"])
def test_a_killed_worker_or_ctrl_c_stops_the_run_cleanly(tmp_path, all_refs_dir, how):
    """A worker killed mid-run, or Ctrl-C (to main.py alone, or to its whole process group, as a
    terminal sends it): the run stops within seconds, saves what it has marked incomplete, exits
    non-zero (1, or 130 for Ctrl-C), and leaves no process or shared memory. A killed worker is
    named, with the unfinished video it was searching; a Ctrl-C prints no traceback."""
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    process, output = start_search(tmp_path, all_refs_dir, marker, new_session=True)
    if how == "Ctrl-C":
        os.kill(process.pid, signal.SIGINT)
    elif how == "Ctrl-C to the process group":
        os.killpg(process.pid, signal.SIGINT)
    elif how == "SIGTERM":
        os.kill(process.pid, signal.SIGTERM)
    else:
        os.kill(worker_pid(process.pid, marker), signal.SIGKILL)
    rest, _ = process.communicate(timeout=120)  # a hang fails here
    text = "".join(output) + rest
    if how != "kill -9 worker":  # SIGTERM (kill, a service manager) stops like Ctrl-C
        assert process.returncode == 130 and "interrupted" in text, text[-3000:]
        assert "Traceback" not in text and "ffmpeg exit code" not in text, text[-3000:]
    else:
        assert process.returncode == 1, text[-3000:]
        assert "pipeline broken: worker-0" in text, text[-3000:]
        assert any(f"worker-0 was working on: {p.name}" in text for p in VIDEOS), text[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["complete"] is False
    time.sleep(0.5)
    assert processes_with_marker(marker) == [], "child processes outlived the run"
    assert f"sfv{process.pid}r" not in shm_names(), "shared memory left behind"


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


def first_child_started(process: subprocess.Popen, marker: str) -> None:
    """Poll until main.py has started its first decoder or worker (spawned, maybe importing)."""
    deadline = time.monotonic() + 600  # a bound for a hang, not a timing requirement
    while time.monotonic() < deadline and process.poll() is None:
        for pid in processes_with_marker(marker):
            try:
                if f"PPid:\t{process.pid}\n" in Path(f"/proc/{pid}/status").read_text() and \
                        b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes() and \
                        b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return
            except OSError:
                continue
        time.sleep(0.005)
    raise AssertionError("no child process was started")


def clip_being_cut(process: subprocess.Popen, out: Path) -> None:
    """Poll until ffmpeg is writing a clip (a .part file in a clips/ folder)."""
    deadline = time.monotonic() + 600
    while not list(out.glob("*/clips/*.mp4.part")):
        assert process.poll() is None, "the run ended before a clip was cut"
        assert time.monotonic() < deadline, "no clip was ever cut"
        time.sleep(0.01)


@pytest.mark.parametrize("moment", ["while the children start", "while a clip is cut"])
def test_a_ctrl_c_to_the_process_group_is_quiet_at_any_moment(tmp_path, all_refs_dir, moment):
    """A terminal's Ctrl-C goes to every process of the group: children still importing ignore it
    (no KeyboardInterrupt traceback), ffmpeg, in its own group, gets none (no 'ffmpeg exit code',
    the parent stops it), and the run ends with 130 leaving no process or shared memory."""
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    videos = video_folder(tmp_path, "obama_whcd.mp4", "short_hamilton_clip.mp4")
    out = tmp_path / "out"
    process, lines, reader = start_logged(search_command(videos, all_refs_dir, out), tmp_path,
                                          {marker: "1"})
    first_child_started(process, marker) if moment == "while the children start" else \
        clip_being_cut(process, out)
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=120)
    reader.join(timeout=30)
    text = "".join(lines)
    assert process.returncode == 130 and "interrupted" in text, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert "ffmpeg exit code" not in text, text[-3000:]
    assert not list(out.rglob("*.part")), "a .part file was left"
    time.sleep(0.5)
    assert processes_with_marker(marker) == [], "child processes outlived the run"
    assert f"sfv{process.pid}r" not in shm_names(), "shared memory left behind"


def test_ctrl_c_while_the_models_load_stops_at_once(tmp_path, all_refs_dir):
    """Ctrl-C before the search has started (photos and models still loading): exit code 130 with
    a message and no traceback, and no process or shared memory is left."""
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    process = subprocess.Popen(search_command(TESTDATA / "videos", all_refs_dir, tmp_path / "out"),
                               env={**os.environ, marker: "1", "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    first = process.stdout.readline()  # "[*] VIDEO_DIR = ...": printed before the models load
    os.kill(process.pid, signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    text = first + rest
    assert process.returncode == 130 and "interrupted" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
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


def comparable(results: dict) -> dict:
    """results.json without what depends on the run: created, stats, and the output folder."""
    settings = {k: v for k, v in results["settings"].items() if k != "OUTPUT_DIR"}
    return {**{k: v for k, v in results.items() if k not in ("created", "stats")}, "settings": settings}


def tool_files(out: Path) -> dict:
    """{relative path: bytes} of every snapshot under out."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("frame_*.jpg"))}


def clip_facts(path: Path) -> tuple:
    """(video frames counted by decoding, container duration in s) of a clip, from ffprobe."""
    done = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                           "-show_entries", "stream=nb_read_frames:format=duration", "-of", "json",
                           str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"ffprobe cannot read {path}: {done.stderr}"
    facts = json.loads(done.stdout)
    return int(facts["streams"][0]["nb_read_frames"]), round(float(facts["format"]["duration"]), 2)


def clips_of(out: Path) -> dict:
    """{relative clip path: clip_facts} of every clip under out."""
    return {p.relative_to(out).as_posix(): clip_facts(p) for p in sorted(out.rglob("clips/*.mp4"))}


def wait_for_file(path: Path, process: subprocess.Popen, bound_s: float = 600) -> None:
    """Poll until path exists (the run still going); the bound only stops a hang."""
    deadline = time.monotonic() + bound_s
    while not path.exists():
        assert process.poll() is None, f"the run ended ({process.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


_HOLD_SHIM = '''"""Test shim (issue #5): a decoder holds one video after some packets, until a file
appears.

SFV_TEST_HOLD = "<file name>|<packets>|<release file>"; only processes named decoder-* hold.
"""
import multiprocessing
import os
import time

_NAME, _PACKETS, _RELEASE = os.environ["SFV_TEST_HOLD"].split("|")


def _held(packets):
    for count, packet in enumerate(packets):
        while count >= int(_PACKETS) and not os.path.exists(_RELEASE):
            time.sleep(0.05)
        yield packet


class _HeldContainer:
    def __init__(self, container):
        self._container = container

    def __getattr__(self, name):
        return getattr(self._container, name)

    def __enter__(self):
        self._container.__enter__()
        return self

    def __exit__(self, *exc):
        return self._container.__exit__(*exc)

    def demux(self, *args, **kwargs):
        return _held(self._container.demux(*args, **kwargs))


def _open(path, *args, **kwargs):
    container = _real_open(path, *args, **kwargs)
    held = os.path.basename(str(path)) == _NAME
    held = held and multiprocessing.current_process().name.startswith("decoder-")
    return _HeldContainer(container) if held else container


import av  # noqa: E402

_real_open, av.open = av.open, _open
'''


def hold_decoder(tmp_path: Path, name: str, packets: int) -> tuple:
    """Return (environment, release file): with the environment, the decoders hold the video
    `name` after `packets` packets until the release file exists (a sitecustomize shim)."""
    shim = tmp_path / "hold_shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_HOLD_SHIM)
    release = tmp_path / "release"
    return {"PYTHONPATH": str(shim), "SFV_TEST_HOLD": f"{name}|{packets}|{release}"}, release


def wait_for_glob(folder: Path, pattern: str, process: subprocess.Popen, bound_s: float = 600) -> None:
    """Poll until a file matching pattern exists in folder (the run still going)."""
    deadline = time.monotonic() + bound_s
    while not list(folder.glob(pattern)):
        assert process.poll() is None, f"the run ended ({process.returncode}) before {folder / pattern}"
        assert time.monotonic() < deadline, f"{folder / pattern} never appeared"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def two_video_run(tmp_path_factory):
    """One uninterrupted run over obama_whcd.mp4 and short_hamilton_clip.mp4 with every reference:
    (its output folder, the videos folder, the refs folder)."""
    base = tmp_path_factory.mktemp("two")
    videos = video_folder(base, "obama_whcd.mp4", "short_hamilton_clip.mp4")
    refs = link_all_refs(base / "refs")
    code, text = run_main(search_command(videos, refs, base / "full"), base)
    assert code == 0, text[-3000:]
    return base / "full", videos, refs


@pytest.mark.parametrize("how", ["Ctrl-C", "kill -9 worker"])
def test_an_interrupted_run_resumed_gives_the_same_results_as_an_uninterrupted_one(two_video_run,
                                                                                 tmp_path, how):
    """Interrupted (Ctrl-C to the process group, or kill -9 of the worker) once the first video is
    saved and the second has a snapshot, its decoder held there, then a rerun: the finished video
    is reused, the unfinished one redone, and results.json, snapshots and clips equal those of a
    run that was never interrupted: nothing lost, nothing duplicated."""
    full, videos, refs = two_video_run
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    env, release = hold_decoder(tmp_path, "short_hamilton_clip.mp4", 150)  # Lin appears at 2.7 s
    cmd = search_command(videos, refs, tmp_path / "resumed")
    process, lines, reader = start_logged(cmd, tmp_path, {marker: "1", **env})
    wait_for_file(tmp_path / "resumed" / "obama_whcd" / "video.json", process)
    wait_for_glob(tmp_path / "resumed" / "short_hamilton_clip", "frame_*.jpg", process)
    if how == "Ctrl-C":
        os.killpg(process.pid, signal.SIGINT)
    else:
        os.kill(worker_pid(process.pid, marker), signal.SIGKILL)
    release.touch()  # the held decoder may go on, and sees the run stopping
    process.wait(timeout=120)
    reader.join(timeout=30)
    assert process.returncode == (130 if how == "Ctrl-C" else 1), "".join(lines)[-3000:]
    interrupted = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert interrupted["videos"][0]["status"] == "ok" and interrupted["complete"] is False
    second = interrupted["videos"][1]
    assert second["status"] == "incomplete" and second["processed_frame_count"] > 0, second["status"]
    assert any("not finished" in e for e in second["errors"]), second["errors"]
    code, text = run_main(cmd, tmp_path)
    assert code == 0, text[-3000:]
    assert "[*] reused: obama_whcd.mp4" in text and "1 of 2 video(s) reused" in text, text[-3000:]
    resumed = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert resumed["stats"]["reused_videos"] == [str((TESTDATA / "videos" / "obama_whcd.mp4").resolve())]
    assert comparable(resumed) == comparable(json.loads((full / "results.json").read_text())), \
        "results.json differs from the uninterrupted run"
    assert tool_files(tmp_path / "resumed") == tool_files(full), "snapshots differ"
    assert clips_of(tmp_path / "resumed") == clips_of(full), "clips differ"
    assert not list((tmp_path / "resumed").rglob("*.part")), "a .part file was left"
    time.sleep(0.5)
    assert processes_with_marker(marker) == [], "child processes outlived the run"


@pytest.fixture(scope="module")
def obama_run(tmp_path_factory):
    """One finished run over obama_whcd.mp4 alone: (its output folder, the videos and refs folders)."""
    base = tmp_path_factory.mktemp("obama")
    refs = base / "refs"
    refs.mkdir()
    for photo in (TESTDATA / "refs").glob("*.jpg"):
        os.symlink(photo, refs / photo.name)
    videos = video_folder(base, "obama_whcd.mp4")
    code, text = run_main(search_command(videos, refs, base / "out"), base)
    assert code == 0, text[-3000:]
    return base / "out", videos, refs


def rerun(obama_run, tmp_path: Path, *extra: str, prepare=None) -> tuple:
    """Copy the obama run's output, optionally change it, run again into it; return (exit code,
    output, results.json, video.json)."""
    out = tmp_path / "out"
    shutil.copytree(obama_run[0], out, symlinks=True)
    if prepare:
        prepare(out)
    code, text = run_main(search_command(obama_run[1], obama_run[2], out, *extra), tmp_path)
    results = json.loads((out / "results.json").read_text())
    return code, text, results, json.loads((out / "obama_whcd" / "video.json").read_text())


def files_match_results(out: Path, results: dict, saved: dict) -> None:
    """Assert that the clips and snapshots on disk are exactly those results.json and video.json
    name (nothing duplicated, nothing missing)."""
    clips = {p.relative_to(out).as_posix() for p in out.rglob("clips/*.mp4")}
    assert clips == {r["clip"] for v in results["videos"] for r in v["ranges"]}, clips
    shots = {p.name for p in (out / "obama_whcd").glob("frame_*.jpg")}
    assert shots == set(saved["snapshots"]) and shots, shots


def test_a_rerun_with_nothing_left_to_do_writes_the_reports_and_exits_0(obama_run, tmp_path):
    """Every video already finished: none is searched, results.json, results.csv and index.html
    are written again with the same entries, and the exit code is 0."""
    def remove_reports(out):
        for name in ("results.json", "results.csv", "index.html"):
            (out / name).unlink()
    code, text, results, saved = rerun(obama_run, tmp_path, prepare=remove_reports)
    assert code == 0, text[-3000:]
    assert "[*] reused: obama_whcd.mp4" in text and "1 of 1 video(s) reused" in text, text[-2000:]
    original = json.loads((obama_run[0] / "results.json").read_text())
    assert comparable(results) == comparable(original)
    assert results["stats"]["processed_frames"] == 0 and results["stats"]["reused_videos"]
    assert (tmp_path / "out" / "results.csv").is_file() and (tmp_path / "out" / "index.html").is_file()


def test_a_changed_result_setting_makes_the_rerun_search_the_video_again(obama_run, tmp_path):
    """--custom-threshold 0.65 instead of 0.70: the saved video no longer fits, it is searched
    again from scratch, and only the new run's clips and snapshots are left."""
    code, text, results, saved = rerun(obama_run, tmp_path, "--custom-threshold", "0.65")
    assert code == 0, text[-3000:]
    assert "searched again: settings changed: CUSTOM_THRESHOLD" in text, text[-3000:]
    assert results["stats"]["reused_videos"] == [] and results["stats"]["processed_frames"] == 60
    assert saved["fingerprint"]["settings"]["CUSTOM_THRESHOLD"] == 0.65
    files_match_results(tmp_path / "out", results, saved)


def test_force_searches_every_video_again_and_leaves_user_files_alone(obama_run, tmp_path):
    """--force redoes a finished video. Once its new results are saved, the files main.py wrote
    earlier that they do not list are removed (here a stale snapshot); files it does not write
    (notes, a clip of the user's) are kept."""
    user_files = ["obama_whcd/notes.txt", "obama_whcd/clips/my_cut.mp4"]

    def add_files(out):
        for name in user_files:
            (out / name).write_text("the user's")
        (out / "obama_whcd" / "frame_0000059_00003.933s_Barack_Obama.jpg").write_bytes(b"stale")
    code, text, results, saved = rerun(obama_run, tmp_path, "--force", prepare=add_files)
    assert code == 0, text[-3000:]
    assert "every video is searched again" in text and "reused:" not in text, text[-3000:]
    assert results["stats"]["processed_frames"] == 60, results["stats"]
    for name in user_files:
        assert (tmp_path / "out" / name).read_text() == "the user's", f"{name} was touched"
    (tmp_path / "out" / "obama_whcd" / "clips" / "my_cut.mp4").unlink()
    files_match_results(tmp_path / "out", results, saved)


def test_a_truncated_video_json_is_ignored_with_a_message_and_the_video_redone(obama_run, tmp_path):
    """A video.json cut off halfway (a crash of the disk, an editor): the rerun says so, naming
    the file, searches the video again and saves a whole video.json."""
    def truncate(out):
        path = out / "obama_whcd" / "video.json"
        path.write_bytes(path.read_bytes()[:500])
    code, text, results, saved = rerun(obama_run, tmp_path, prepare=truncate)
    assert code == 0, text[-3000:]
    path = tmp_path / "out" / "obama_whcd" / "video.json"
    assert f"[!] {path}: cannot be read" in text and "searched again" in text, text[-3000:]
    assert results["stats"]["processed_frames"] == 60 and saved["entry"] == results["videos"][0]
    files_match_results(tmp_path / "out", results, saved)


def test_force_interrupted_at_once_keeps_the_earlier_results_whole(obama_run, tmp_path):
    """--force, then Ctrl-C (to the process group) as soon as the run has decided to search the
    video again: its earlier clips, snapshots and video.json are all still there, byte for byte
    (nothing is removed before its new results are saved), so a rerun without --force reuses
    them, removing only a tool file its video.json does not list."""
    out = tmp_path / "out"
    shutil.copytree(obama_run[0], out, symlinks=True)
    reports = {out / name for name in ("results.json", "results.csv", "index.html")}
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p not in reports}
    assert any(p.suffix == ".mp4" for p in before) and any(p.suffix == ".jpg" for p in before)
    process = subprocess.Popen(search_command(obama_run[1], obama_run[2], out, "--force"), cwd=tmp_path,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if "every video is searched again" in line:
            break
    os.killpg(process.pid, signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    text = "".join(output) + rest
    assert process.returncode == 130 and "Traceback" not in text, text[-3000:]
    assert f"sfv{process.pid}r" not in shm_names(), "shared memory left behind"
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p not in reports}
    assert after == before, f"changed or lost: {sorted(str(p) for p in set(before) ^ set(after))}"
    # a snapshot that a later run, interrupted, left: the rerun that reuses the video removes it
    leftover = out / "obama_whcd" / "frame_0000099_00006.600s_Barack_Obama.jpg"
    leftover.write_bytes(b"left by an interrupted run")
    code, text = run_main(search_command(obama_run[1], obama_run[2], out), tmp_path)
    assert code == 0 and "[*] reused: obama_whcd.mp4" in text, text[-3000:]
    assert not leftover.exists() and "removed 1 file(s) an interrupted later run left" in text, text
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p not in reports} == before


def test_a_moved_copy_of_the_video_folder_reuses_the_results(obama_run, tmp_path):
    """The videos copied to another folder (another path, another modification time, as after a
    move to another disk): each is recognised by its content, its saved results are reused, and
    results.json lists it under its new path."""
    moved = tmp_path / "elsewhere" / "videos"
    moved.mkdir(parents=True)
    shutil.copy(TESTDATA / "videos" / "obama_whcd.mp4", moved / "obama_whcd.mp4")  # new mtime
    out = tmp_path / "out"
    shutil.copytree(obama_run[0], out, symlinks=True)
    code, text = run_main(search_command(moved, obama_run[2], out), tmp_path)
    assert code == 0, text[-3000:]
    assert "[*] reused: obama_whcd.mp4" in text and "searched again" not in text, text[-3000:]
    results = json.loads((out / "results.json").read_text())
    original = json.loads((obama_run[0] / "results.json").read_text())
    assert results["stats"]["processed_frames"] == 0, results["stats"]
    assert results["videos"][0]["file"] == str((moved / "obama_whcd.mp4").resolve())
    assert {**results["videos"][0], "file": None} == {**original["videos"][0], "file": None}


def test_a_worse_rerun_does_not_replace_good_results(obama_run, tmp_path, ffmpeg_exe):
    """The same name, but a truncated copy of the video (a failed download), searched with
    --force: it ends incomplete (exit 1) and saves no video.json; the earlier run's video.json
    and every earlier file stay, except those this run wrote again under the same name and
    lists in results.json (its own clip of the same range) - a result that would never be
    reused must not replace or delete one that is."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    source = (TESTDATA / "videos" / "obama_whcd.mp4").read_bytes()
    cut = damaged / "obama_whcd.mp4"
    subprocess.run([ffmpeg_exe, "-v", "error", "-i", str(TESTDATA / "videos" / "obama_whcd.mp4"),
                    "-c", "copy", "-movflags", "+faststart", str(cut)], check=True)
    cut.write_bytes(cut.read_bytes()[:len(cut.read_bytes()) // 2])
    assert cut.read_bytes() != source
    out = tmp_path / "out"
    shutil.copytree(obama_run[0], out, symlinks=True)
    def video_files():
        return {p.relative_to(out).as_posix(): p.read_bytes()
                for p in sorted((out / "obama_whcd").rglob("*")) if p.is_file()}
    before = video_files()
    assert any(name.endswith(".mp4") for name in before) and "obama_whcd/video.json" in before
    code, text = run_main(search_command(damaged, obama_run[2], out, "--force"), tmp_path)
    assert code == 1 and "truncated" in text, text[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["videos"][0]["status"] == "incomplete", results["videos"][0]["status"]
    after = video_files()
    rewritten = {r["clip"] for r in results["videos"][0]["ranges"] if r["clip"]}
    gone = [name for name in before if name not in after
            or (after[name] != before[name] and name not in rewritten)]
    assert gone == [], f"the earlier, good results lost or changed: {gone}"
    assert after["obama_whcd/video.json"] == before["obama_whcd/video.json"]


def write_half_a_message(result_q) -> None:
    """Child: write the start of a 1 MiB message into result_q's pipe, as a child killed while
    sending a large track leaves it, then die by SIGKILL."""
    import struct
    payload = b"x" * 2**20
    os.write(result_q._writer.fileno(), struct.pack("!i", len(payload)) + payload[:32768])
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_child_killed_while_writing_a_large_message_is_noticed(main_module):
    """A child killed halfway through writing a message larger than a pipe holds (a track lists
    every frame) leaves the parent's read of it blocked for ever: the parent's main loop still
    notices the dead child within seconds (PipelineBroken with its exit code) instead of hanging,
    since a reader thread does the reading (issue #5)."""
    ctx = mp.get_context("spawn")
    result_q = ctx.Queue()
    child = ctx.Process(target=write_half_a_message, args=(result_q,), name="worker-0")
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL, child.exitcode
    pipe = main_module.Pipeline(ctx, None, None, None, None, [], result_q, ctx.Event(), [child])
    main_module.start_result_reader(pipe)
    state = types.SimpleNamespace(lock=threading.RLock(), write_error=None)
    raised = []

    def follow():
        try:
            main_module.follow_children(state, pipe, {})
        except main_module.PipelineBroken as error:
            raised.append(error)
    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    follower.join(timeout=60)  # a bound for a hang, not a timing requirement
    pipe.reader_stop.set()
    assert not follower.is_alive(), "the parent hangs on the half-written message"
    assert raised and (raised[0].name, raised[0].exitcode) == ("worker-0", -9), raised
    assert "check dmesg for the OOM killer" in str(raised[0]), str(raised[0])


def decoder_pid(parent_pid: int, marker: str) -> int:
    """The PID of the run's decoder: a spawned child without onnxruntime (not the resource tracker)."""
    for pid in processes_with_marker(marker):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            spawned = b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            if f"PPid:\t{parent_pid}\n" in status and spawned \
                    and "onnxruntime" not in Path(f"/proc/{pid}/maps").read_text():
                return pid
        except OSError:
            continue
    raise AssertionError(f"no decoder process among {processes_with_marker(marker)}")


def test_a_killed_decoder_stops_the_run_and_names_its_video(tmp_path, all_refs_dir):
    """kill -9 of a decoder mid-run: the run stops, names the video that decoder was decoding
    (marked not finished in results.json), keeps the videos finished before, exits 1, and leaves
    no process or shared memory."""
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    process, output = start_search(tmp_path, all_refs_dir, marker)
    os.kill(decoder_pid(process.pid, marker), signal.SIGKILL)
    rest, _ = process.communicate(timeout=120)  # a hang fails here
    text = "".join(output) + rest
    assert process.returncode == 1, text[-3000:]
    assert "pipeline broken: decoder-0 stopped (exit code -9)" in text, text[-3000:]
    names = [p.name for p in VIDEOS if f"decoder-0 was working on: {p.name}." in text]
    assert len(names) == 1, text[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["complete"] is False
    entry = next(v for v in results["videos"] if Path(v["file"]).name == names[0])
    assert entry["status"] != "ok" and any("decoder-0" in e for e in entry["errors"]), entry["errors"]
    for video in results["videos"]:
        if video["status"] == "ok":  # finished before the kill: saved for a rerun
            saved = json.loads((tmp_path / "out" / video["output_folder"] / "video.json").read_text())
            assert saved["entry"] == video
    time.sleep(0.5)
    assert processes_with_marker(marker) == [], "child processes outlived the run"
    assert f"sfv{process.pid}r" not in shm_names(), "shared memory left behind"


# Environment: models, ffmpeg, the output folder, a full disk (issue #5) -----------------------
@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_model_file_stops_the_run_naming_it(tmp_path, damage):
    """A pack whose recognizer is random bytes, cut off halfway, or empty: exit code 2 before any
    search, and the message names the file and says to download the pack again."""
    pack = tmp_path / "models" / "models" / "broken_pack"
    pack.mkdir(parents=True)
    source = MODEL_ROOT / "models" / MODEL_PACK
    os.symlink(source / "det_500m.onnx", pack / "det_500m.onnx")
    data = (source / "w600k_mbf_int8.onnx").read_bytes()
    damaged = {"garbage": os.urandom(len(data)), "truncated": data[:len(data) // 2], "empty": b""}
    (pack / "w600k_mbf_int8.onnx").write_bytes(damaged[damage])
    cmd = search_command(TESTDATA / "videos", TESTDATA / "refs", tmp_path / "out")
    cmd[cmd.index("--model-root") + 1] = str(tmp_path / "models")
    cmd[cmd.index("--model-pack") + 1] = "broken_pack"
    code, text = run_main(cmd, tmp_path)
    assert code == 2, text[-3000:]
    assert f"{pack / 'w600k_mbf_int8.onnx'}: not a valid ONNX model" in text, text[-3000:]
    assert "download the pack again" in text and "Traceback" not in text, text[-3000:]


def test_without_any_ffmpeg_the_search_still_runs_and_reports_clips_not_cut(main_module, tmp_path):
    """No ffmpeg in FFMPEG_DIR, none on PATH, and imageio-ffmpeg missing: every video is still
    searched and reported, the ranges have no clip, the problem is listed, and the exit code is 1.
    Such a video is not complete, so a later run with ffmpeg searches it again."""
    shim, empty = tmp_path / "shim", tmp_path / "empty"
    shim.mkdir()
    empty.mkdir()
    (shim / "imageio_ffmpeg.py").write_text('raise ImportError("imageio-ffmpeg is not installed (test)")\n')
    videos = video_folder(tmp_path, "obama_whcd.mp4")
    out = tmp_path / "out"
    code, text = run_main(search_command(videos, TESTDATA / "refs", out, "--ffmpeg-dir", str(empty)),
                          tmp_path, {"PATH": str(empty), "PYTHONPATH": str(shim)})
    assert code == 1, text[-3000:]
    assert "ffmpeg: NOT FOUND" in text and "clips were not cut" in text, text[-3000:]
    results = json.loads((out / "results.json").read_text())
    entry = results["videos"][0]
    assert results["ffmpeg"] is None and entry["detections"] and entry["ranges"], entry["ranges"]
    assert [r["clip"] for r in entry["ranges"]] == [None] * len(entry["ranges"])
    assert not list(out.rglob("*.mp4")), "no ffmpeg, yet a clip exists"
    saved = json.loads((out / "obama_whcd" / "video.json").read_text())
    problem = main_module.reuse_problem(saved, saved["fingerprint"], out / "obama_whcd", out)
    assert problem and "clips were not cut" in problem, problem


@pytest.mark.parametrize("where", ["below a file", "a file"])
def test_an_output_folder_that_cannot_be_made_stops_the_run_before_any_work(tmp_path, where):
    """OUTPUT_DIR below a regular file, or a file itself: exit code 2 with a message naming the
    folder, before the models are loaded or any video is opened."""
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the output folder should be")
    out = blocker / "out" if where == "below a file" else blocker
    code, text = run_main(search_command(TESTDATA / "videos", TESTDATA / "refs", out), tmp_path)
    assert code == 2, text[-3000:]
    assert f"error: output folder {out} " in text and "--output" in text, text[-3000:]
    assert "[*] people:" not in text, "the models were loaded before the folder was checked"


def test_an_output_folder_without_write_permission_stops_the_run_before_any_work():
    """A read-only OUTPUT_DIR (run as an unprivileged user: root may write anywhere): exit code 2,
    'Permission denied' naming the folder, before the models are loaded."""
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="sfv-permission-"))  # pytest's tmp_path is 0700
    try:
        base.chmod(0o755)
        out = base / "out"
        out.mkdir(mode=0o555)
        out.chmod(0o555)
        cmd = search_command(TESTDATA / "videos", TESTDATA / "refs", out)
        if os.geteuid() == 0:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        code, text = run_main(cmd, base)
    finally:
        out.chmod(0o755)
        shutil.rmtree(base)
    assert code == 2, text[-3000:]
    assert f"error: output folder {out} cannot be written (Permission denied)" in text, text[-3000:]
    assert "[*] people:" not in text, "the models were loaded before the folder was checked"


_FULL_DISK_SHIM = '''"""Test shim (issue #5): pathlib writes under SFV_TEST_FULL_DISK fail as on a full disk."""
import errno
import os
import pathlib

_FULL = os.environ["SFV_TEST_FULL_DISK"]
_write_bytes = pathlib.Path.write_bytes


def _write_bytes_on_a_full_disk(self, data):
    if not str(self).startswith(_FULL):
        return _write_bytes(self, data)
    open(self, "wb").close()  # a full disk still creates the file, then fails to write it
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))


pathlib.Path.write_bytes = _write_bytes_on_a_full_disk
'''


@pytest.fixture()
def small_disk(tmp_path):
    """A folder on a 4 MiB tmpfs when mount is allowed (root), with fill() filling it for real;
    elsewhere a plain folder, and fill() returns the environment of a shim that makes every write
    under it fail with ENOSPC in main.py and its children. Yields (folder, fill, kind)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                                 capture_output=True, timeout=60).returncode == 0
    except OSError:  # no mount command
        mounted = False

    def fill() -> dict:
        if not mounted:
            (tmp_path / "shim").mkdir()
            (tmp_path / "shim" / "sitecustomize.py").write_text(_FULL_DISK_SHIM)
            return {"PYTHONPATH": str(tmp_path / "shim"), "SFV_TEST_FULL_DISK": str(folder)}
        with open(folder / "filler", "wb") as filler:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
        return {}
    yield folder, fill, "tmpfs" if mounted else "ENOSPC shim"
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_stops_the_run_and_keeps_what_was_saved_before(small_disk, tmp_path):
    """The disk fills up while a second video is searched: exit code 1, 'No space left on device'
    naming the file; the previous results.json stays whole, no .part file is left, and the video
    finished before (video.json, clip, snapshots) survives unchanged."""
    folder, fill, kind = small_disk
    out = folder / "out"
    code, text = run_main(search_command(video_folder(tmp_path / "a", "obama_whcd.mp4"),
                                         TESTDATA / "refs", out), tmp_path)
    assert code == 0, text[-3000:]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    env = fill()
    videos = video_folder(tmp_path / "b", "obama_whcd.mp4", "short_hamilton_clip.mp4")
    code, text = run_main(search_command(videos, TESTDATA / "refs", out), tmp_path, env)
    assert code == 1, f"{kind}: {text[-3000:]}"
    assert "[*] reused: obama_whcd.mp4" in text, f"{kind}: {text[-3000:]}"
    message = f"cannot write {out / 'results.json'}: No space left on device"
    assert message in text, f"{kind}: {text[-3000:]}"
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert not [p for p in after if p.name.endswith(".part")], f"{kind}: .part files left"
    changed = [p for p, data in before.items() if after.get(p) != data]
    assert changed == [], f"{kind}: files saved before were changed or lost: {changed}"
    assert json.loads(after[out / "results.json"])["complete"] is True


def test_videos_inside_the_output_folder_are_not_searched(main_module, tmp_path, capsys):
    """With OUTPUT_DIR inside VIDEO_DIR, the clips an earlier run cut there are not inputs of the
    next run: they are left out of the video list, with a note saying how many."""
    videos = tmp_path / "videos"
    clips = videos / "out" / "obama_whcd" / "clips"
    clips.mkdir(parents=True)
    (videos / "talk.mp4").write_bytes(b"a video")
    (clips / "0.00s_Barack_Obama_d0.543.mp4").write_bytes(b"a clip")
    kept = main_module.videos_outside_output(main_module.list_videos(videos), videos / "out")
    assert kept == [(videos / "talk.mp4").resolve()], kept
    assert "1 video(s) inside the output folder" in capsys.readouterr().out
