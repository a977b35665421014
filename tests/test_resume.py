"""Reuse (findpeople/resume.py and run.plan_indexes): a rerun reuses each video's index when
nothing it was made from changed, and each snapshot and clip that made.json lists as made from
the same thing; interrupted, forced, moved and worse reruns end to end."""
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
from findpeople.index import INDEX_SETTINGS, open_index
from findpeople.resume import (
    MADE_FILE, clip_key, execution_fingerprint, execution_text, made_before, made_entry, read_made,
    remove_unlisted_files, reused_clip_problem, snapshot_key, tool_output_files, video_fingerprint,
    write_made)
from findpeople.runstate import RunState


# What a rerun reuses: an index, a snapshot, a clip -------------------------------------------
SEARCH_TIME_SETTINGS = {"CUSTOM_THRESHOLD", "MATCH_MARGIN", "MIN_TRACK_HITS", "MERGE_GAP_TOLERANCE",
                        "CLIP_DURATION_BEFORE", "CLIP_DURATION_AFTER", "CLIP_MODE",
                        "BOX_PADDING_PERCENTAGE"}


def test_index_settings_are_settings_and_none_applies_only_at_search_time(main_module):
    """INDEX_SETTINGS (a change indexes the videos again) are settings of the block, and hold
    what shapes faces, tracks and looks; the matching, range, clip and snapshot settings apply
    at search time (a change decodes nothing), and speed, folders and debug settings change no
    index either (models and providers count by their files' SHA-256 and what really runs)."""
    names = set(main_module.SETTING_NAMES)
    assert set(INDEX_SETTINGS) <= names, f"unknown: {set(INDEX_SETTINGS) - names}"
    assert len(set(INDEX_SETTINGS)) == len(INDEX_SETTINGS), INDEX_SETTINGS
    assert {"FRAME_INTERVAL", "MIN_FACE_SIZE", "DET_SIZE", "det_prob_threshold"} <= set(INDEX_SETTINGS)
    assert not SEARCH_TIME_SETTINGS & set(INDEX_SETTINGS), SEARCH_TIME_SETTINGS & set(INDEX_SETTINGS)
    neutral = {"NUM_GPU_PROCESSES", "BATCH_SIZE", "OUTPUT_DIR", "INDEX_DIR", "VIDEO_DIR",
               "REFERENCE_DIR", "RESUME", "debug_det", "debug_rec", "PROVIDERS", "MODEL_ROOT", "RAY_ADDRESS"}
    assert not neutral & set(INDEX_SETTINGS), neutral & set(INDEX_SETTINGS)


@pytest.fixture()
def made_folder(main_module, tmp_path):
    """A video's folder with a clip and a snapshot listed in its made.json as a run lists them:
    (folder, {file name: key}, (video fingerprint, range, look, settings))."""
    folder = tmp_path / "out" / "obama_whcd"
    (folder / "clips").mkdir(parents=True)
    video = tmp_path / "obama_whcd.mp4"
    video.write_bytes(b"not really a video")
    settings = main_module.load_settings([])
    fingerprint = video_fingerprint(str(video))
    span = make_range(main_module, "Barack_Obama", 0.0, 4.0, 0.412)
    look = (5, 0.333, (10.0, 20.0, 110.0, 140.0), 0.41234)
    clip, shot = "clips/0.00s_Barack_Obama_d0.412.mp4", "frame_0000005_00000.333s_Barack_Obama.jpg"
    (folder / clip).write_bytes(b"clip")
    (folder / shot).write_bytes(b"jpeg")
    keys = {clip: clip_key(fingerprint, span, settings), shot: snapshot_key(fingerprint, look, 0, settings)}
    write_made(folder, {clip: made_entry(folder, clip, keys[clip], clip_start=0.0),
                        shot: made_entry(folder, shot, keys[shot])})
    return folder, keys, (fingerprint, span, look, settings)


def test_made_json_lists_each_file_with_its_key_size_and_clip_start(main_module, made_folder):
    """made.json holds, per file made in the video's folder, what it was made from (as JSON reads
    it back), its size in bytes, and for a clip where it starts; a key computed again from the
    same things finds each file reusable."""
    folder, keys, _ = made_folder
    made = read_made(folder)
    clip, shot = sorted(keys)
    assert made[clip] == {"key": json.loads(json.dumps(keys[clip])), "bytes": 4, "clip_start": 0.0}, made
    assert made[shot] == {"key": json.loads(json.dumps(keys[shot])), "bytes": 4}, made
    for name, key in keys.items():
        assert made_before(made, folder, name, key) == made[name], name


def _spoil(folder, facts, main_module, what):
    """Return (file name, key) after one change of a made file or of what it is made from."""
    fingerprint, span, look, settings = facts
    clip, shot = "clips/0.00s_Barack_Obama_d0.412.mp4", "frame_0000005_00000.333s_Barack_Obama.jpg"
    other_video = {**fingerprint, "sampled_sha256": "0" * 64}
    changes = {
        "clip: video changed": lambda: (clip, clip_key(other_video, span, settings)),
        "clip: range changed": lambda: (clip, clip_key(fingerprint, make_range(
            main_module, "Barack_Obama", 0.0, 4.5, 0.412), settings)),
        "clip: mode changed": lambda: (clip, clip_key(fingerprint, span, main_module.load_settings(
            ["--clip-mode", "fast"]))),
        "snapshot: padding changed": lambda: (shot, snapshot_key(fingerprint, look, 0, main_module.load_settings(
            ["--box-padding-percentage", "20"]))),
        "snapshot: other person's colour": lambda: (shot, snapshot_key(fingerprint, look, 1, settings)),
        "snapshot: other box": lambda: (shot, snapshot_key(fingerprint, (5, 0.333, (12.0, 20.0, 110.0, 140.0),
                                                                         0.41234), 0, settings)),
        "snapshot: video changed": lambda: (shot, snapshot_key(other_video, look, 0, settings)),
    }
    if what in changes:
        return changes[what]()
    name = clip if what.startswith("clip") else shot
    if what.endswith("missing"):
        (folder / name).unlink()
    else:  # e.g. rewritten by a later run with other settings, interrupted
        (folder / name).write_bytes(b"another file")
    return name, clip_key(fingerprint, span, settings) if name == clip else snapshot_key(fingerprint, look, 0, settings)


@pytest.mark.parametrize("what", [
    "clip: video changed", "clip: range changed", "clip: mode changed", "clip: missing",
    "clip: other size", "snapshot: padding changed", "snapshot: other person's colour",
    "snapshot: other box", "snapshot: video changed", "snapshot: missing", "snapshot: other size"])
def test_a_made_file_is_not_reused_when_it_or_what_it_is_made_from_changed(main_module, made_folder, what):
    """A clip is made again when the video, its range or CLIP_MODE changed; a snapshot when the
    video, the face, its person (colour) or BOX_PADDING_PERCENTAGE changed; either when its
    file is gone or has another size than made.json says."""
    folder, _, facts = made_folder
    name, key = _spoil(folder, facts, main_module, what)
    assert made_before(read_made(folder), folder, name, key) is None, what


@pytest.mark.parametrize("argv, look", [
    (["--custom-threshold", "0.65", "--min-track-hits", "3", "--merge-gap-tolerance", "9"], None),
    ([], (5, 0.333, [10.0, 20.0, 110.0, 140.0], 0.4118)),  # a list box, a distance rounding alike
])
def test_a_made_file_is_reused_when_only_what_does_not_shape_it_changed(main_module, made_folder, argv, look):
    """Settings that do not shape a file (matching settings, when the range comes out the same)
    and differences that JSON or rounding erase (a tuple or a list, distance to 3 decimals)
    leave both files reusable."""
    folder, keys, (fingerprint, span, look0, _) = made_folder
    settings = main_module.load_settings(argv)
    clip, shot = sorted(keys)
    made = read_made(folder)
    assert made_before(made, folder, clip, clip_key(fingerprint, span, settings)) is not None
    assert made_before(made, folder, shot, snapshot_key(fingerprint, look or look0, 0, settings)) is not None


@pytest.mark.parametrize("content", [
    b'{"format": 1, "files": {"clips/a.mp4": {"key": ', b"", b"\xff\xfe not utf-8", b"[1, 2, 3]",
    b'{"format": 99, "files": {"clips/a.mp4": {"key": {}, "bytes": 4}}}',
    b'{"format": 1, "files": {"clips/a.mp4": {"key": {}}}}',  # no size: never reused
    b'{"format": 1, "files": {"clips/a.mp4": "not an entry"}}',
])
def test_a_truncated_or_foreign_made_json_lists_nothing(main_module, tmp_path, content):
    """A made.json that is missing, truncated, not JSON, another version's, or whose entry lacks
    its size lists nothing: every snapshot and clip of the video is made again."""
    assert read_made(tmp_path) == {}
    (tmp_path / MADE_FILE).write_bytes(content)
    assert read_made(tmp_path) == {}, content


def test_only_files_main_writes_are_found_for_removal(main_module, tmp_path):
    """Only a video's snapshots, clips, made.json (and an older version's video.json) and their
    .part files can be removed (when its outputs are complete, if this run did not list them): a
    user's files in the same folders are never touched."""
    folder = tmp_path / "obama_whcd"
    (folder / "clips").mkdir(parents=True)
    ours = ["frame_0000005_00000.333s_Barack_Obama.jpg", "frame_0000005_00000.333s_Barack_Obama.jpg.part",
            "frame_1234567_123456.250s_Zoë Saldaña.jpg", "made.json", "made.json.part", "video.json",
            "frame_0000001_-0000.033s_Barack_Obama.jpg", "frame_12345678_411522.189s_Barack_Obama.jpg",
            "clips/0.00s_Barack_Obama_d0.412.mp4", "clips/12.34s_Barack_Obama_d1.000.mp4.part"]
    theirs = ["notes.txt", "frame_5.jpg", "my_frame_0000005_00000.333s_X.jpg", "made.json.bak",
              "clips/holiday.mp4", "clips/0.00s_Barack_Obama_d0.412.mov", "results.json"]
    for name in ours + theirs:
        (folder / name).write_bytes(b"x")
    found = sorted(p.relative_to(folder).as_posix() for p in tool_output_files(folder))
    assert found == sorted(ours), f"found {found}"
    assert tool_output_files(tmp_path / "missing") == []


def test_removing_unlisted_files_keeps_the_listed_ones_made_json_and_the_users(main_module, made_folder):
    """remove_unlisted_files removes main.py's files in a video's folder that a run did not list
    (an earlier run's snapshot, a .part left by an interruption, an older version's video.json)
    and keeps the listed ones, made.json and a user's files."""
    folder, keys, _ = made_folder
    (folder / "clips" / "9.00s_Barack_Obama_d0.500.mp4.part").write_bytes(b"half a clip")
    (folder / "frame_0000009_00000.600s_Barack_Obama.jpg").write_bytes(b"stale")
    (folder / "video.json").write_text("{}")
    (folder / "notes.txt").write_text("the user's")
    removed = remove_unlisted_files(folder, set(keys))
    assert sorted(p.name for p in removed) == ["9.00s_Barack_Obama_d0.500.mp4.part",
                                               "frame_0000009_00000.600s_Barack_Obama.jpg", "video.json"]
    left = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert left == sorted([*keys, MADE_FILE, "notes.txt"]), left


@pytest.mark.parametrize("errors, removed", [([], True), (["x.mp4: decoding stopped after 30 processed frames"], False)])
def test_stale_tool_files_are_removed_only_after_a_video_ended_ok(main_module, made_folder, errors, removed):
    """When a video's outputs are complete, made.json is written with what this run made and,
    only if the video ended "ok", the tool files it did not list are removed: a video that
    ended with an error keeps every earlier file (issue #5: a worse run loses nothing)."""
    folder, keys, _ = made_folder
    settings = main_module.load_settings(["--output", str(folder.parent)])
    state = RunState([make_info(main_module)], settings, None, {"people": []})
    result = state.results[0]
    result.finished = result.searched = True
    result.errors = list(errors)
    shot = "frame_0000005_00000.333s_Barack_Obama.jpg"
    result.made = {shot: made_entry(folder, shot, keys[shot])}
    state.outputs_done(result)
    assert set(read_made(folder)) == {shot}
    clip = folder / "clips" / "0.00s_Barack_Obama_d0.412.mp4"
    assert clip.exists() is not removed, f"errors={errors}: the unlisted clip exists: {clip.exists()}"
    assert (folder / shot).exists()


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
    """execution_fingerprint (part of an index's identity) records the providers PROVIDERS resolves to here whose libraries load
    (onnxruntime-gpu lists TensorRT even where it is not installed) and, with a GPU provider
    among them, the visible GPU models: indexes made on a GPU are not reused on a CPU-only
    machine, nor CUDA fp32 indexes where TensorRT fp16 now runs."""
    import onnxruntime
    cpu = execution_fingerprint(main_module.load_settings(["--providers", "cpu"]))
    assert cpu == {"providers": ["CPUExecutionProvider"], "gpus": []}, cpu
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr("findpeople.resume.visible_gpu_names", lambda: ["NVIDIA H200", "NVIDIA H200"])
    monkeypatch.setattr("findpeople.resume.provider_library_error",
                        lambda p: "libnvinfer.so.10: cannot open" if p.startswith("Tensorrt") else None)
    gpu = execution_fingerprint(main_module.load_settings(["--providers", "auto"]))
    assert gpu == {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                "gpus": ["NVIDIA H200"]}, gpu
    monkeypatch.setattr("findpeople.resume.provider_library_error", lambda p: None)
    trt = execution_fingerprint(main_module.load_settings(["--providers", "auto"]))
    assert trt["providers"][0] == "TensorrtExecutionProvider", trt


@pytest.mark.parametrize("execution, words", [
    ({"providers": ["CPUExecutionProvider"], "gpus": []}, "CPUExecutionProvider on no GPU"),
    ({"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"], "gpus": ["NVIDIA H200"]},
     "CUDAExecutionProvider > CPUExecutionProvider on NVIDIA H200"),
    (None, "unknown providers"),  # an index without it (edited by hand)
])
def test_execution_text_says_what_ran_the_models_in_words(main_module, execution, words):
    """execution_text gives an execution fingerprint as the words a message shows."""
    assert execution_text(execution) == words


# Reruns end to end: a copy of the session's run (conftest.search) run again ------------------
def comparable(results: dict) -> dict:
    """results.json without what depends on the run: created, stats, whether each index was
    reused, and the output and index folders."""
    settings = {k: v for k, v in results["settings"].items() if k not in ("OUTPUT_DIR", "INDEX_DIR")}
    videos = [{k: v for k, v in video.items() if k != "index_reused"} for video in results["videos"]]
    return {**{k: v for k, v in results.items() if k not in ("created", "stats")},
            "settings": settings, "videos": videos}


def index_of(out: Path) -> Path:
    """The index folder of a test run's output folder (conftest.search_command puts it beside)."""
    return out.with_name(out.name + "_index")


def tool_files(out: Path) -> dict:
    """{relative path: bytes} of every snapshot under out."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("frame_*.jpg"))}


def made_files(out: Path) -> dict:
    """{relative path: (inode, modification time in ns, bytes)} of every snapshot and clip under
    out: a file reused keeps all three, one made again (renamed into place) does not."""
    return {p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted([*out.rglob("frame_*.jpg"), *out.rglob("clips/*.mp4")])}


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


def copy_of_search(search, tmp_path: Path) -> Path:
    """Copy the session run's output folder and its index folder into tmp_path (modification
    times kept, as a move keeps them); return the copy's output folder."""
    out = tmp_path / "out"
    shutil.copytree(search["out"], out, symlinks=True)
    shutil.copytree(index_of(search["out"]), index_of(out), symlinks=True)
    return out


def rerun(search, tmp_path: Path, videos: Path, *extra: str, prepare=None) -> dict:
    """Run again into a copy of the session run's output (and index), after prepare(out) if
    given, with its reference photos and these videos; return the exit code, the output, the new
    results.json, and made_files before and after."""
    out = copy_of_search(search, tmp_path)
    if prepare:
        prepare(out)
    before = made_files(out)
    code, text = run_main(search_command(videos, search["out"].parent / "refs", out, *extra), tmp_path)
    return {"code": code, "text": text, "out": out, "before": before, "after": made_files(out),
            "results": json.loads((out / "results.json").read_text())}


def obama_videos(tmp_path: Path) -> Path:
    """A videos folder holding obama_whcd.mp4 alone (a link to the shared clip): its output
    folder and index keep the name obama_whcd, as in the session run."""
    return video_folder(tmp_path, "obama_whcd.mp4")


OBAMA = str((TESTDATA / "videos" / "obama_whcd.mp4").resolve())


def files_match_results(out: Path, results: dict) -> None:
    """Assert that the clips and snapshots of each video on disk are exactly those that
    results.json and its made.json name (nothing stale, nothing missing)."""
    for video in results["videos"]:
        folder = out / video["output_folder"]
        clips = {p.relative_to(out).as_posix() for p in folder.glob("clips/*.mp4")}
        assert clips == {r["clip"] for r in video["ranges"]}, clips
        made = set(read_made(folder))
        assert {p.relative_to(folder).as_posix() for p in folder.glob("clips/*.mp4")} == \
            {name for name in made if name.startswith("clips/")}, made
        shots = {p.name for p in folder.glob("frame_*.jpg")}
        assert shots == {name for name in made if name.startswith("frame_")}, (shots, made)
        assert bool(shots) == bool(video["ranges"]), shots


@pytest.fixture(scope="module")
def reused_run(search, tmp_path_factory):
    """The session run run again, unchanged, into a copy of its output without its reports."""
    def remove_reports(out):
        for name in ("results.json", "results.csv", "index.html"):
            (out / name).unlink()
    return rerun(search, tmp_path_factory.mktemp("reused"), TESTDATA / "videos", prepare=remove_reports)


def test_a_rerun_reuses_every_index_and_decodes_no_frame(search, reused_run):
    """Nothing changed: every video's index is reused (none is decoded: 0 frames processed, as
    results.json's stats say), each entry keeps the frame count it was indexed with and says
    "index_reused", the summary says so, and the exit code is 0."""
    text, results = reused_run["text"], reused_run["results"]
    assert reused_run["code"] == 0, text[-3000:]
    assert "3 video(s) reused, 0 to index" in text and "indexed again" not in text, text[-3000:]
    stats, first = results["stats"], search["results"]
    assert stats["processed_frames"] == 0 and stats["indexed_videos"] == [], stats
    assert stats["index_reused_videos"] == [v["file"] for v in first["videos"]], stats
    counts = [(v["processed_frame_count"], v["index_reused"]) for v in results["videos"]]
    assert counts == [(v["processed_frame_count"], True) for v in first["videos"]], counts
    assert text.count("(index reused)") >= 3, text[-3000:]


def test_a_rerun_reuses_every_clip_and_snapshot_and_writes_the_same_reports(search, reused_run):
    """Nothing changed: every clip and snapshot is reused (the same file: same inode and
    modification time, not cut or written again), and results.json, results.csv and index.html
    are written again with the same entries."""
    assert reused_run["after"] == reused_run["before"], "clips or snapshots made again"
    assert any(name.endswith(".mp4") for name in reused_run["after"]), reused_run["after"]
    assert comparable(reused_run["results"]) == comparable(search["results"])
    out = reused_run["out"]
    assert (out / "results.csv").read_bytes() == (search["out"] / "results.csv").read_bytes()
    assert (out / "index.html").is_file()
    files_match_results(out, reused_run["results"])


def test_changed_search_settings_decode_nothing_and_remake_only_what_they_shape(search, tmp_path):
    """CUSTOM_THRESHOLD, MATCH_MARGIN, MIN_TRACK_HITS, MERGE_GAP_TOLERANCE, CLIP_* and
    BOX_PADDING_PERCENTAGE apply at search time: the index is reused (no frame decoded), the
    clips of the new ranges are cut and the snapshots made with the new padding (none is kept
    as it was, though some have the same names), and the files of the earlier run that the new
    one does not list are removed (the video ended ok)."""
    run = rerun(search, tmp_path, obama_videos(tmp_path), "--custom-threshold", "0.65",
                "--match-margin", "0.1", "--min-track-hits", "3", "--merge-gap-tolerance", "3",
                "--clip-duration-before", "1", "--clip-duration-after", "1.5", "--clip-mode",
                "fast", "--box-padding-percentage", "20")
    text, results = run["text"], run["results"]
    assert run["code"] == 0, text[-3000:]
    assert "1 video(s) reused, 0 to index" in text and "indexed again" not in text, text[-3000:]
    assert results["stats"]["processed_frames"] == 0, results["stats"]
    assert results["videos"][0]["processed_frame_count"] == 60 and results["videos"][0]["ranges"]
    made = read_made(run["out"] / "obama_whcd")
    assert {e["key"]["mode"] for n, e in made.items() if n.startswith("clips/")} == {"fast"}, made
    assert {e["key"]["padding"] for n, e in made.items() if n.startswith("frame_")} == {20}, made
    old = [name for name in run["before"] if name.startswith("obama_whcd/")]
    kept = [name for name in old if run["after"].get(name) == run["before"][name]]
    assert old and kept == [], f"earlier files kept as they were: {kept}"
    files_match_results(run["out"], results)


def test_a_changed_index_setting_indexes_the_video_again_naming_it(search, tmp_path):
    """--min-face-size 40 instead of 32 (an INDEX_SETTING): the rerun says why the video is
    indexed again, naming the setting and both values, decodes all its frames, and writes an
    index made with the new value; the other videos' indexes are left alone."""
    others = {p: p.read_bytes() for p in index_of(search["out"]).glob("*.parquet")
              if p.name != "obama_whcd.parquet"}
    run = rerun(search, tmp_path, obama_videos(tmp_path), "--min-face-size", "40")
    text, results = run["text"], run["results"]
    assert run["code"] == 0, text[-3000:]
    assert "[*] obama_whcd.mp4: indexed again: " in text, text[-3000:]
    assert "indexing settings changed: MIN_FACE_SIZE 32 -> 40" in text, text[-3000:]
    assert "0 video(s) reused, 1 to index" in text, text[-3000:]
    assert results["stats"]["processed_frames"] == 60, results["stats"]
    assert results["stats"]["indexed_videos"] == [OBAMA], results["stats"]
    parquet, metadata = open_index(index_of(run["out"]) / "obama_whcd.parquet")
    parquet.close()
    assert metadata["settings"]["MIN_FACE_SIZE"] == 40, metadata["settings"]
    for path, data in others.items():
        assert (index_of(run["out"]) / path.name).read_bytes() == data, f"{path.name} changed"
    files_match_results(run["out"], results)


@pytest.mark.parametrize("flag, why", [("--force", "(--force: RESUME off)"), ("--reindex", "(--reindex)")])
def test_force_and_reindex_index_again_and_leave_user_files_alone(search, tmp_path, flag, why):
    """--force and --reindex index the video again (every frame decoded, the index rewritten).
    --force also remakes every snapshot and clip; --reindex reuses those that come out the same.
    Once the video ended ok, the files main.py wrote earlier that this run does not list are
    removed (a stale snapshot); files it does not write (notes, a clip of the user's) stay."""
    user_files = ["obama_whcd/notes.txt", "obama_whcd/clips/my_cut.mp4"]
    stale = "obama_whcd/frame_0000099_00006.600s_Barack_Obama.jpg"  # the video has 60 frames

    def add_files(out):
        for name in user_files:
            (out / name).write_text("the user's")
        (out / stale).write_bytes(b"stale")
    index = index_of(search["out"]) / "obama_whcd.parquet"
    run = rerun(search, tmp_path, obama_videos(tmp_path), flag, prepare=add_files)
    text, results = run["text"], run["results"]
    assert run["code"] == 0, text[-3000:]
    assert f"0 video(s) reused, 1 to index {why}" in text, text[-3000:]
    assert results["stats"]["processed_frames"] == 60, results["stats"]
    new_index = index_of(run["out"]) / "obama_whcd.parquet"
    assert new_index.stat().st_mtime_ns != index.stat().st_mtime_ns, "the index was not rewritten"
    for name in user_files:
        assert (run["out"] / name).read_text() == "the user's", f"{name} was touched"
    assert not (run["out"] / stale).exists(), "the stale snapshot was kept"
    kept = {n: run["before"][n] for n in run["before"]
            if n.startswith("obama_whcd/") and n not in (stale, *user_files)}
    remade = [n for n in kept if run["after"].get(n) != kept[n]]
    assert remade == (sorted(kept) if flag == "--force" else []), f"{flag}: made again: {remade}"
    (run["out"] / "obama_whcd" / "clips" / "my_cut.mp4").unlink()
    files_match_results(run["out"], results)


def wait_for_files(paths: list, process: subprocess.Popen, bound_s: float = 600) -> None:
    """Poll until every path exists (the run still going); the bound only stops a hang."""
    deadline = time.monotonic() + bound_s
    while not all(path.exists() for path in paths):
        assert process.poll() is None, f"the run ended ({process.returncode}) before {paths} appeared"
        assert time.monotonic() < deadline, f"{[p for p in paths if not p.exists()]} never appeared"
        time.sleep(0.1)


_HOLD_SHIM = '''"""Test shim (issue #5): a decoder holds one video after some packets, until a file
appears.

SFV_TEST_HOLD = "<file name>|<packets>|<release file>"; only processes named decoder-* hold, and
the first to hold makes <release file>.held.
"""
import multiprocessing
import os
import time

_NAME, _PACKETS, _RELEASE = os.environ["SFV_TEST_HOLD"].split("|")


def _held(packets):
    for count, packet in enumerate(packets):
        if count == int(_PACKETS):
            open(_RELEASE + ".held", "w").close()
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
    `name` after `packets` packets (making <release file>.held) until the release file exists
    (a sitecustomize shim)."""
    shim = tmp_path / "hold_shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_HOLD_SHIM)
    release = tmp_path / "release"
    return {"PYTHONPATH": str(shim), "SFV_TEST_HOLD": f"{name}|{packets}|{release}"}, release


@pytest.mark.parametrize("how", ["Ctrl-C", "kill -9 worker"])
def test_an_interrupted_run_resumed_gives_the_same_results_as_an_uninterrupted_one(search, tmp_path, how):
    """Interrupted (Ctrl-C to the process group, or kill -9 of the worker) once the first two
    videos are finished (indexed, clips cut) and the third is midway, its decoder held there;
    then a rerun reuses the finished videos' indexes and indexes only the third, and results.json,
    snapshots and clips equal those of the session's run, never interrupted: nothing lost,
    nothing duplicated."""
    full, refs = search["out"], search["out"].parent / "refs"
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    env, release = hold_decoder(tmp_path, "short_hamilton_clip.mp4", 150)  # Lin appears at 2.7 s
    out = tmp_path / "resumed"
    cmd = search_command(TESTDATA / "videos", refs, out)
    process, lines, reader = start_logged(cmd, tmp_path, {marker: "1", **env})
    wait_for_files([out / "obama_whcd" / MADE_FILE, release.with_name("release.held")], process)
    if how == "Ctrl-C":
        os.killpg(process.pid, signal.SIGINT)
    else:
        os.kill(worker_pid(process.pid, marker), signal.SIGKILL)
    release.touch()  # the held decoder may go on, and sees the run stopping
    process.wait(timeout=120)
    reader.join(timeout=30)
    assert process.returncode == (130 if how == "Ctrl-C" else 1), "".join(lines)[-3000:]
    interrupted = json.loads((out / "results.json").read_text())
    assert [v["status"] for v in interrupted["videos"][:2]] == ["ok", "ok"], interrupted["videos"][:2]
    third = interrupted["videos"][2]
    assert third["status"] == "incomplete" and third["processed_frame_count"] > 0, third["status"]
    assert any("not finished" in e for e in third["errors"]), third["errors"]
    indexes = sorted(p.name for p in index_of(out).glob("*.parquet"))
    assert indexes == ["crowd_royal_opera_house.parquet", "obama_whcd.parquet"], indexes
    code, text = run_main(cmd, tmp_path)
    assert code == 0, text[-3000:]
    assert "2 video(s) reused, 1 to index" in text, text[-3000:]
    resumed = json.loads((out / "results.json").read_text())
    files = [v["file"] for v in resumed["videos"]]
    assert resumed["stats"]["index_reused_videos"] == files[:2], resumed["stats"]
    assert resumed["stats"]["indexed_videos"] == files[2:], resumed["stats"]
    assert comparable(resumed) == comparable(search["results"]), \
        "results.json differs from the uninterrupted run"
    assert tool_files(out) == tool_files(full), "snapshots differ"
    assert clips_of(out) == clips_of(full), "clips differ"
    assert not list(out.rglob("*.part")), "a .part file was left"
    time.sleep(0.5)
    assert processes_with_marker(marker) == [], "child processes outlived the run"


def test_index_only_needs_no_photo_and_a_later_search_decodes_nothing(main_module, ffmpeg_exe, tmp_path):
    """--index-only with no reference folder at all: exit 0, the video's index is written,
    nothing in OUTPUT_DIR (not even the folder). A later search with photos reuses that index:
    no frame decoded, the frame count and the tracker's counts (why nobody was found) come
    from the index."""
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(ffmpeg_exe, videos / "pattern.mp4", "320x240", "-c:v", "libx264", "-preset",
               "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac")
    out = tmp_path / "out"
    code, text = run_main(search_command(videos, tmp_path / "no_photos", out, "--index-only"), tmp_path)
    assert code == 0, text[-3000:]
    assert "0 video(s) reused, 1 to index" in text and f"[*] indexes: {index_of(out)}" in text, text[-3000:]
    assert (index_of(out) / "pattern.parquet").is_file(), sorted(index_of(out).iterdir())
    assert not out.exists(), f"--index-only wrote into {out}: {sorted(out.rglob('*'))}"
    code, text = run_main(search_command(videos, link_all_refs(tmp_path / "refs"), out), tmp_path)
    assert code == 0, text[-3000:]
    assert "1 video(s) reused, 0 to index" in text, text[-3000:]
    results = json.loads((out / "results.json").read_text())
    entry = results["videos"][0]
    assert results["stats"]["processed_frames"] == 0, results["stats"]
    assert (entry["index_reused"], entry["processed_frame_count"], entry["status"]) == (True, 75, "ok"), entry
    assert "[*] pattern.mp4: nobody found: no face was detected in it" in text, text[-3000:]


def test_index_only_leaves_an_earlier_searchs_outputs_alone(search, tmp_path):
    """--index-only over an output folder an earlier search filled (its index current): exit 0,
    and nothing in OUTPUT_DIR is written or removed: not made.json, not a snapshot or clip (it
    searches nothing, so it lists none of them)."""
    out = copy_of_search(search, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, text = run_main(search_command(obama_videos(tmp_path), tmp_path / "no_photos", out,
                                         "--index-only"), tmp_path)
    assert code == 0 and "1 video(s) reused, 0 to index" in text, text[-3000:]
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    changed = sorted(str(p.relative_to(out)) for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert changed == [], f"--index-only changed or removed in OUTPUT_DIR: {changed}"


def test_a_moved_copy_of_the_video_folder_reuses_the_index_and_clips(search, tmp_path):
    """The video copied to another folder (another path, another modification time, as after a
    move to another disk): it is recognised by its content, its index, snapshots and clips are
    reused, and results.json lists it under its new path."""
    moved = tmp_path / "elsewhere" / "videos"
    moved.mkdir(parents=True)
    shutil.copy(TESTDATA / "videos" / "obama_whcd.mp4", moved / "obama_whcd.mp4")  # new mtime
    run = rerun(search, tmp_path, moved)
    text, results = run["text"], run["results"]
    assert run["code"] == 0, text[-3000:]
    assert "1 video(s) reused, 0 to index" in text and "indexed again" not in text, text[-3000:]
    assert results["stats"]["processed_frames"] == 0, results["stats"]
    entry = results["videos"][0]
    original = next(v for v in search["results"]["videos"] if v["output_folder"] == "obama_whcd")
    assert entry["file"] == str((moved / "obama_whcd.mp4").resolve())
    assert {**entry, "file": None, "index_reused": None} == {**original, "file": None, "index_reused": None}
    obama = {n: v for n, v in run["before"].items() if n.startswith("obama_whcd/")}
    assert obama and {n: run["after"].get(n) for n in obama} == obama, "snapshots or clips made again"


def test_a_worse_rerun_does_not_replace_the_good_index_nor_lose_files(search, tmp_path, ffmpeg_exe):
    """The same name, but a truncated copy of the video (a failed download), run with --force:
    it ends incomplete (exit 1) and writes no index, so the earlier, good index stays; and as
    the video did not end ok, no earlier file is removed: only those this run wrote again under
    the same name (its clips, listed in results.json, and made.json) changed."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    cut = damaged / "obama_whcd.mp4"
    subprocess.run([ffmpeg_exe, "-v", "error", "-i", str(TESTDATA / "videos" / "obama_whcd.mp4"),
                    "-c", "copy", "-movflags", "+faststart", str(cut)], check=True)
    cut.write_bytes(cut.read_bytes()[:len(cut.read_bytes()) // 2])
    index = (index_of(search["out"]) / "obama_whcd.parquet").read_bytes()
    folder = search["out"] / "obama_whcd"
    before = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert any(name.endswith(".mp4") for name in before) and MADE_FILE in before
    run = rerun(search, tmp_path, damaged, "--force")
    assert run["code"] == 1 and "truncated" in run["text"], run["text"][-3000:]
    entry = run["results"]["videos"][0]
    assert entry["status"] == "incomplete", entry["status"]
    assert (index_of(run["out"]) / "obama_whcd.parquet").read_bytes() == index, "the good index was replaced"
    folder = run["out"] / "obama_whcd"
    after = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    rewritten = {Path(r["clip"]).relative_to("obama_whcd").as_posix() for r in entry["ranges"] if r["clip"]}
    gone = [name for name in before if name not in after
            or (after[name] != before[name] and name not in rewritten | {MADE_FILE})]
    assert gone == [], f"the earlier, good results lost or changed: {gone}"


def truncate_made_json(out: Path) -> None:
    """Cut the video's made.json off halfway (a crash of the disk, an editor)."""
    path = out / "obama_whcd" / MADE_FILE
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def truncate_index(out: Path) -> None:
    """Cut the video's index off halfway (a run killed while copying it)."""
    path = index_of(out) / "obama_whcd.parquet"
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


@pytest.mark.parametrize("spoil, frames, remade", [(truncate_made_json, 0, True), (truncate_index, 60, False)])
def test_a_truncated_made_json_or_index_costs_only_what_it_lists(search, tmp_path, spoil, frames, remade):
    """A truncated made.json: the index is still reused (no frame decoded) but every snapshot
    and clip is made again, and a whole made.json lists them. A truncated index: the video is
    indexed again, saying why and naming the file, but its snapshots and clips, made from the
    same ranges, are reused."""
    run = rerun(search, tmp_path, obama_videos(tmp_path), prepare=spoil)
    text, results = run["text"], run["results"]
    assert run["code"] == 0, text[-3000:]
    assert results["stats"]["processed_frames"] == frames, results["stats"]
    if spoil is truncate_index:
        path = index_of(run["out"]) / "obama_whcd.parquet"
        assert f"[*] obama_whcd.mp4: indexed again: {path}: truncated or damaged" in text, text[-3000:]
    obama = {n: v for n, v in run["before"].items() if n.startswith("obama_whcd/")}
    same = [n for n in obama if run["after"].get(n) == obama[n]]
    assert obama and same == ([] if remade else list(obama)), f"reused: {same}"
    files_match_results(run["out"], results)


def test_force_interrupted_at_once_keeps_the_earlier_results_whole(search, tmp_path):
    """--force, then Ctrl-C (to the process group) as soon as the run has decided to index the
    video again: its earlier index, clips, snapshots and made.json are all still there, byte for
    byte (nothing is removed before the video ends ok), so a rerun without --force reuses them,
    removing only a tool file that made.json does not list."""
    out = copy_of_search(search, tmp_path)
    videos = obama_videos(tmp_path)
    reports = {out / name for name in ("results.json", "results.csv", "index.html")}

    def saved():  # the reports and the unnamed people's face crops are remade by every search
        return {p: p.read_bytes() for p in [*out.rglob("*"), *index_of(out).glob("*.parquet")]
                if p.is_file() and p not in reports and "unnamed_people" not in p.parts}
    before = saved()
    assert any(p.suffix == ".mp4" for p in before) and any(p.suffix == ".jpg" for p in before)
    process = subprocess.Popen(search_command(videos, search["out"].parent / "refs", out, "--force"),
                               cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if "1 to index (--force: RESUME off)" in line:
            break
    os.killpg(process.pid, signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    text = "".join(output) + rest
    assert process.returncode == 130 and "Traceback" not in text, text[-3000:]
    assert f"sfv{process.pid}r" not in shm_names(), "shared memory left behind"
    after = saved()
    assert after == before, f"changed or lost: {sorted(str(p) for p in set(before) ^ set(after))}"
    # a snapshot that a later run, interrupted, left: the rerun that reuses the video removes it
    leftover = out / "obama_whcd" / "frame_0000099_00006.600s_Barack_Obama.jpg"
    leftover.write_bytes(b"left by an interrupted run")
    code, text = run_main(search_command(videos, search["out"].parent / "refs", out), tmp_path)
    assert code == 0 and "1 video(s) reused, 0 to index" in text, text[-3000:]
    assert not leftover.exists(), "the leftover snapshot was kept"
    made = out / "obama_whcd" / MADE_FILE
    assert json.loads(saved()[made])["files"] == json.loads(before[made])["files"]
    assert {p: d for p, d in saved().items() if p != made} == {p: d for p, d in before.items() if p != made}


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
def test_a_made_clip_is_checked_as_a_new_clip_is(main_module, ffmpeg_exe, tmp_path, damage, reason):
    """A clip made before is reused only if it passes the check a new clip passes before it is
    renamed: a video stream, a frame that decodes, as long as the video it was cut from."""
    source = make_video(ffmpeg_exe, tmp_path / "tone.mp4", "320x240", "-c:v", "libx264", "-preset",
                        "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac")
    info = probe_video(source, 0, "tone")
    folder = tmp_path / "out" / "tone"
    span = TimeRange("Alice", 1.0, 2.5, 0.4, 1.0, 2.0)
    clip = cut_clip(ffmpeg_exe, info, span, folder / "clips")
    if damage is not None:
        damage(ffmpeg_exe, clip)
    name = clip.relative_to(folder).as_posix()
    entry = made_entry(folder, name, {}, clip_start=1.0)
    problem = reused_clip_problem(folder, name, entry, info, span.end_s, "accurate")
    assert problem == reason, f"{damage and damage.__name__}: {problem!r}"


def test_a_made_clip_without_video_is_cut_again_not_reused(search, tmp_path, ffmpeg_exe):
    """A clip made.json lists with its size although it has no video (what an earlier version
    kept): the rerun says so, naming it, and cuts it again from the reused index (no frame
    decoded); the new clip plays, as long as its range."""
    def break_clip(out):
        path = out / "obama_whcd" / MADE_FILE
        made = json.loads(path.read_text())
        clip = next(name for name in made["files"] if name.startswith("clips/"))
        without_video(ffmpeg_exe, out / "obama_whcd" / clip)
        made["files"][clip]["bytes"] = (out / "obama_whcd" / clip).stat().st_size
        path.write_text(json.dumps(made))
    run = rerun(search, tmp_path, obama_videos(tmp_path), prepare=break_clip)
    text, results = run["text"], run["results"]
    assert run["code"] == 0, text[-3000:]
    assert f"[*] {run['out'] / 'obama_whcd' / 'clips'}/" in text \
        and ": cut again: the clip has no video stream" in text, text[-3000:]
    assert results["stats"]["processed_frames"] == 0, results["stats"]
    for new in results["videos"][0]["ranges"]:
        frames, _ = clip_facts(run["out"] / new["clip"])
        expected = round((new["end"] - new["clip_start"]) * 15)  # obama_whcd.mp4: 15 fps
        assert abs(frames - expected) <= 1, f"{new['clip']}: {frames} frames, expected {expected}"
