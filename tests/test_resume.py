"""Resume (findpeople/resume.py): video.json per finished video, reused only when nothing it
depends on changed; interrupted, forced, moved and worse reruns end to end."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import make_info, make_range, processes_with_marker, run_main, search_command, shm_names, start_logged, video_folder, worker_pid
from conftest import TESTDATA, link_all_refs, make_video
from findpeople.clips import TimeRange, cut_clip
from findpeople.decode import probe_video
from findpeople.errors import BadInput
from findpeople.reports import video_report
from findpeople.resume import (
    _NEUTRAL_SETTINGS, _RESULT_SETTINGS, read_saved_video, replace_saved_video, reuse_problem,
    run_fingerprint, save_video_results, saved_clips_problem, tool_output_files, video_fingerprint)
from findpeople.runstate import VideoResult


# Resume: what a saved video depends on -------------------------------------------------------
def test_every_setting_is_either_result_changing_or_neutral(main_module):
    """Each setting is listed exactly once: in _RESULT_SETTINGS (a change makes a rerun search the
    video again) or in _NEUTRAL_SETTINGS (speed, folders, debug); a new setting must be sorted in."""
    result, neutral = set(_RESULT_SETTINGS), set(_NEUTRAL_SETTINGS)
    names = set(main_module.SETTING_NAMES)
    assert not result & neutral, f"in both lists: {result & neutral}"
    assert result | neutral == names, \
        f"unsorted: {names - result - neutral}; unknown: {(result | neutral) - names}"
    assert {"CUSTOM_THRESHOLD", "FRAME_INTERVAL", "CLIP_MODE", "MODEL_PACK_NAME"} <= result
    assert {"NUM_GPU_PROCESSES", "BATCH_SIZE", "OUTPUT_DIR", "debug_det", "RESUME"} <= neutral


@pytest.fixture()
def saved_video(main_module, tmp_path):
    """A finished video saved as a run saves it: (saved dict, fingerprint, folder, output dir)."""
    out = tmp_path / "out"
    folder = out / "obama_whcd"
    (folder / "clips").mkdir(parents=True)
    video = tmp_path / "obama_whcd.mp4"
    video.write_bytes(b"not really a video")
    (folder / "clips" / "0.00s_Barack_Obama_d0.412.mp4").write_bytes(b"clip")
    (folder / "frame_0000005_00000.333s_Barack_Obama.jpg").write_bytes(b"jpeg")
    (folder / "frame_0000009_00000.600s_Barack_Obama.jpg").write_bytes(b"stale, not this run's")
    result = VideoResult(make_info(main_module, path=str(video)), processed_frame_count=60,
                                     sent_frame_count=60, finished=True)
    result.ranges = [make_range(main_module, "Barack_Obama", 0.0, 4.0, 0.412)]
    result.clips = [(str(folder / "clips" / "0.00s_Barack_Obama_d0.412.mp4"), 0.0)]
    settings = main_module.load_settings([])
    fingerprint = {"video": video_fingerprint(str(video)),
                   **run_fingerprint(settings, [], [])}
    entry = video_report(result, out, 1)
    snapshots = ["frame_0000005_00000.333s_Barack_Obama.jpg",  # on disk
                 "frame_0000007_00000.467s_Barack_Obama.jpg"]  # reported, but deleted since
    save_video_results(folder / "video.json", fingerprint, entry, snapshots)
    saved = read_saved_video(folder / "video.json")
    return saved, fingerprint, folder, out


def test_a_saved_finished_video_with_its_files_is_reusable(main_module, saved_video):
    """video.json holds the entry, the fingerprint, and the snapshots the run reported that are on
    disk (not the others there), with each listed file's size; nothing changed: reusable."""
    saved, fingerprint, folder, out = saved_video
    assert saved["snapshots"] == ["frame_0000005_00000.333s_Barack_Obama.jpg"], saved["snapshots"]
    assert saved["file_bytes"] == {"obama_whcd/frame_0000005_00000.333s_Barack_Obama.jpg": 4,
                                   "obama_whcd/clips/0.00s_Barack_Obama_d0.412.mp4": 4}, saved
    assert saved["fingerprint"] == fingerprint
    assert reuse_problem(saved, fingerprint, folder, out) is None


def _change(saved, fingerprint, folder, what):
    """Apply one change to a saved video (see the table below)."""
    entry = saved["entry"]
    if what == "status":
        entry["status"] = "incomplete"
    elif what == "errors":
        entry["errors"] = ["obama_whcd.mp4: decoding stopped after 30 processed frames"]
    elif what == "clip not cut":
        entry["ranges"][0]["clip"] = None
    elif what == "clip missing":
        (folder / "clips" / "0.00s_Barack_Obama_d0.412.mp4").unlink()
    elif what == "snapshot missing":
        (folder / "frame_0000005_00000.333s_Barack_Obama.jpg").unlink()
    elif what == "clip changed":  # e.g. rewritten by a later run with other settings, interrupted
        (folder / "clips" / "0.00s_Barack_Obama_d0.412.mp4").write_bytes(b"another clip")
    elif what == "snapshot changed":
        (folder / "frame_0000005_00000.333s_Barack_Obama.jpg").write_bytes(b"another jpeg")
    elif what == "video changed":
        fingerprint["video"]["sampled_sha256"] = "0" * 64
    elif what == "providers changed":
        fingerprint["execution"] = {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                    "gpus": ["NVIDIA H200"]}
    elif what == "setting changed":
        fingerprint["settings"]["CUSTOM_THRESHOLD"] = 0.65
    elif what == "photo changed":
        fingerprint["references"] = [["Barack_Obama", ["0" * 64]]]
    elif what == "model changed":
        fingerprint["models"] = {"det_500m.onnx": "0" * 64}
    elif what == "no ranges field":
        del entry["ranges"]


@pytest.mark.parametrize("what, reason", [
    ("status", "did not finish"),  # interrupted, or a decoder or worker died
    ("errors", "did not finish"),  # finished with an error (e.g. a clip failed)
    ("clip not cut", "clips were not cut"),  # no ffmpeg, or stopped while cutting
    ("clip missing", "files are missing"),  # deleted by the user
    ("snapshot missing", "files are missing"),
    ("clip changed", "files changed since it was saved"),
    ("snapshot changed", "files changed since it was saved"),
    ("video changed", "video file changed"),  # other content (size, or a sampled MiB)
    ("providers changed", "it was searched with CPUExecutionProvider on no GPU, this run uses "
                          "CUDAExecutionProvider > CPUExecutionProvider on NVIDIA H200"),
    ("setting changed", "settings changed: CUSTOM_THRESHOLD"),
    ("photo changed", "reference photos changed"),
    ("model changed", "model files changed"),
    ("no ranges field", "lacks fields"),  # edited by hand
])
def test_a_saved_video_is_not_reused_when_unfinished_or_anything_changed(main_module, saved_video,
                                                                         what, reason):
    """A saved video is searched again unless it finished without errors, every clip and snapshot
    is on disk, and the video, the result settings, the photos and the models are unchanged."""
    saved, fingerprint, folder, out = saved_video
    _change(saved, fingerprint, folder, what)
    problem = reuse_problem(saved, fingerprint, folder, out)
    assert problem is not None and reason in problem, f"{what}: {problem!r}"


@pytest.mark.parametrize("content", [
    b'{"format": 2, "fingerprint": {"video": {"size": 1', b"", b"\xff\xfe not utf-8",
    b"[1, 2, 3]", b'{"format": 99, "fingerprint": {}, "snapshots": [], "file_bytes": {}, "entry": {}}',
    b'{"format": 2, "fingerprint": {}, "snapshots": [], "entry": {}}',
    b'{"format": 1, "fingerprint": {}, "snapshots": [], "entry": {}}',  # before file sizes
])
def test_a_truncated_or_foreign_video_json_is_rejected_naming_it(main_module, tmp_path, content):
    """A video.json that is truncated, not JSON, or not this version's raises BadInput naming the
    file (the video is then searched again); a missing one is simply None."""
    path = tmp_path / "video.json"
    assert read_saved_video(path) is None
    path.write_bytes(content)
    with pytest.raises(BadInput, match="video.json") as raised:
        read_saved_video(path)
    assert str(path) in str(raised.value) and "searched again" in str(raised.value)


def test_only_files_main_writes_are_found_for_removal(main_module, tmp_path):
    """Only a video's snapshots, clips, video.json and their .part files can be removed (when
    its results are saved or reused, if they do not list them): a user's files in the same
    folders are never touched."""
    folder = tmp_path / "obama_whcd"
    (folder / "clips").mkdir(parents=True)
    ours = ["frame_0000005_00000.333s_Barack_Obama.jpg", "frame_0000005_00000.333s_Barack_Obama.jpg.part",
            "frame_1234567_123456.250s_Zoë Saldaña.jpg", "video.json", "video.json.part",
            "frame_0000001_-0000.033s_Barack_Obama.jpg", "frame_12345678_411522.189s_Barack_Obama.jpg",
            "clips/0.00s_Barack_Obama_d0.412.mp4", "clips/12.34s_Barack_Obama_d1.000.mp4.part"]
    theirs = ["notes.txt", "frame_5.jpg", "my_frame_0000005_00000.333s_X.jpg", "video.json.bak",
              "clips/holiday.mp4", "clips/0.00s_Barack_Obama_d0.412.mov", "results.json"]
    for name in ours + theirs:
        (folder / name).write_bytes(b"x")
    found = sorted(p.relative_to(folder).as_posix() for p in tool_output_files(folder))
    assert found == sorted(ours), f"found {found}"
    assert tool_output_files(tmp_path / "missing") == []


def test_saving_new_results_removes_only_what_they_do_not_list(main_module, saved_video):
    """When a video's new results are saved, main.py's files in its folder that they do not list
    (an earlier run's snapshot, a .part left by an interruption) are removed; the listed ones and
    a user's files stay. Until then nothing is removed (issue #5: a rerun stopped early loses
    nothing)."""
    saved, fingerprint, folder, out = saved_video
    (folder / "clips" / "9.00s_Barack_Obama_d0.500.mp4.part").write_bytes(b"half a clip")
    (folder / "notes.txt").write_text("the user's")
    replace_saved_video(folder / "video.json", fingerprint, saved["entry"],
                                    saved["snapshots"])
    left = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert left == ["clips/0.00s_Barack_Obama_d0.412.mp4", "frame_0000005_00000.333s_Barack_Obama.jpg",
                    "notes.txt", "video.json"], left


def test_a_video_is_recognised_by_its_content_not_its_path_or_time(main_module, tmp_path):
    """video_fingerprint: a copy elsewhere with another modification time is the same video (a
    moved or remounted folder keeps its results); a change of size, or of a byte in the first,
    middle or last MiB, makes it another."""
    import os
    import random
    data = bytearray(random.Random(3).randbytes(5 * 2**20 + 123))
    original, copy = tmp_path / "a" / "v.mp4", tmp_path / "b" / "v.mp4"
    for path in (original, copy):
        path.parent.mkdir()
        path.write_bytes(data)
    os.utime(copy, (1_000_000_000, 1_000_000_000))
    assert video_fingerprint(str(copy)) == video_fingerprint(str(original))
    for offset in (10, len(data) // 2, len(data) - 10):
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        copy.write_bytes(changed)
        assert video_fingerprint(str(copy)) != \
            video_fingerprint(str(original)), f"a byte changed at {offset}"
    copy.write_bytes(data + b"x")
    assert video_fingerprint(str(copy)) != video_fingerprint(str(original))


def test_the_fingerprint_names_the_providers_and_gpus_that_run_the_models(main_module, monkeypatch):
    """run_fingerprint records the providers PROVIDERS resolves to here whose libraries load
    (onnxruntime-gpu lists TensorRT even where it is not installed) and, with a GPU provider
    among them, the visible GPU models: results made on a GPU are not reused on a CPU-only
    machine, nor CUDA fp32 results where TensorRT fp16 now runs."""
    import onnxruntime
    cpu = run_fingerprint(main_module.load_settings(["--providers", "cpu"]), [], [])
    assert cpu["execution"] == {"providers": ["CPUExecutionProvider"], "gpus": []}, cpu
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr("findpeople.resume.visible_gpu_names", lambda: ["NVIDIA H200", "NVIDIA H200"])
    monkeypatch.setattr("findpeople.resume.provider_library_error",                         lambda p: "libnvinfer.so.10: cannot open" if p.startswith("Tensorrt") else None)
    gpu = run_fingerprint(main_module.load_settings(["--providers", "auto"]), [], [])
    assert gpu["execution"] == {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                "gpus": ["NVIDIA H200"]}, gpu
    monkeypatch.setattr("findpeople.resume.provider_library_error", lambda p: None)
    trt = run_fingerprint(main_module.load_settings(["--providers", "auto"]), [], [])
    assert trt["execution"]["providers"][0] == "TensorrtExecutionProvider", trt


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


# A reused clip is checked as a new one is (issue #11) ---------------------------------------
def without_video(ffmpeg_exe: str, clip: Path) -> None:
    """Replace a clip by its audio alone, in a valid MP4 (what ffmpeg wrote for a raw stream)."""
    audio_only = clip.with_name("audio only.mp4")
    subprocess.run([ffmpeg_exe, "-nostdin", "-v", "error", "-i", str(clip), "-vn", "-c", "copy",
                    str(audio_only)], check=True, timeout=60)
    audio_only.replace(clip)


def one_frame(ffmpeg_exe: str, clip: Path) -> None:
    """Replace a clip by its first frame."""
    short = clip.with_name("short.mp4")
    subprocess.run([ffmpeg_exe, "-nostdin", "-v", "error", "-i", str(clip), "-frames:v", "1",
                    "-c", "copy", str(short)], check=True, timeout=60)
    short.replace(clip)


def truncated(ffmpeg_exe: str, clip: Path) -> None:
    """Cut a clip off 100 bytes into its frames (its index is before them: +faststart)."""
    data = clip.read_bytes()
    clip.write_bytes(data[:data.index(b"mdat") + 100])


@pytest.mark.parametrize("damage, reason", [
    (None, None),
    (without_video, "the clip has no video stream"),
    (one_frame, "the clip has 0.040 s of video where the video has 1.520 s"),
    (truncated, "the clip has no frame that decodes"),
])
def test_a_saved_clip_is_checked_as_a_new_clip_is(main_module, ffmpeg_exe, tmp_path, damage, reason):
    """A saved clip is reused only if it passes the check a new clip passes before it is renamed:
    a video stream, a frame that decodes, as long as the video it was cut from."""
    source = make_video(ffmpeg_exe, tmp_path / "tone.mp4", "320x240", "-c:v", "libx264", "-preset",
                        "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac")
    info = probe_video(source, 0, "tone")
    out = tmp_path / "out"
    span = TimeRange("Alice", 1.0, 2.5, 0.4, 1.0, 2.0)
    result = VideoResult(info, processed_frame_count=75, sent_frame_count=75, finished=True)
    result.ranges = [span]
    result.clips = [(str(cut_clip(ffmpeg_exe, info, span, out / "tone" / "clips")), 1.0)]
    if damage is not None:
        damage(ffmpeg_exe, Path(result.clips[0][0]))
    problem = saved_clips_problem(video_report(result, out, 1), info, out, "accurate")
    expected = reason and f"its clip tone/clips/1.00s_Alice_d0.400.mp4 does not play as cut: {reason}"
    assert problem == expected, f"{damage and damage.__name__}: {problem!r}"


def test_a_saved_clip_without_video_is_cut_again_not_reused(obama_run, tmp_path, ffmpeg_exe):
    """A clip an earlier version saved although it had no video (its size recorded in
    video.json): the rerun says so, searches the video again, and its new clip plays."""
    def break_clip(out):
        path = out / "obama_whcd" / "video.json"
        saved = json.loads(path.read_text())
        clip = saved["entry"]["ranges"][0]["clip"]
        without_video(ffmpeg_exe, out / clip)
        saved["file_bytes"][clip] = (out / clip).stat().st_size
        path.write_text(json.dumps(saved))
    code, text, results, saved = rerun(obama_run, tmp_path, prepare=break_clip)
    assert code == 0, text[-3000:]
    assert "searched again: its clip obama_whcd/clips/" in text \
        and "does not play as cut: the clip has no video stream" in text, text[-3000:]
    assert results["stats"]["processed_frames"] == 60, results["stats"]
    new = results["videos"][0]["ranges"][0]
    frames, _ = clip_facts(tmp_path / "out" / new["clip"])
    expected = round((new["end"] - new["clip_start"]) * 15)  # obama_whcd.mp4: 15 fps
    assert abs(frames - expected) <= 1, f"{new['clip']}: {frames} frames, expected {expected}"
