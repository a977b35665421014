"""Section 7, Reports: results.json and results.csv, written atomically, one CSV row per range."""
from __future__ import annotations

import csv
import json
from fractions import Fraction

import pytest


def make_info(main_module, idx=0, path="/videos/obama_whcd.mp4", output_name="obama_whcd"):
    """Return a VideoInfo built directly (4 s at 15 fps)."""
    return main_module.VideoInfo(
        idx=idx, path=path, output_name=output_name, width=844, height=614, fps=15.0,
        frame_count=60, duration_s=4.0, time_base=Fraction(1, 15360), origin_pts=0,
        video_start_offset_s=0.0, has_audio=True)


def make_run(main_module, settings, **extra):
    """Return the run-level part of the report, as main() builds it (no photos on disk)."""
    import numpy as np
    people = [main_module.Reference(n, [f"/refs/{n}.jpg"], np.zeros((1, 4), np.float32))
              for n in ("Barack_Obama", "Michelle_Obama")]
    return {**main_module.run_header(settings, people, None), "tool": "test", **extra}


def make_range(main_module, name, start_s, end_s, distance):
    """Return a TimeRange whose sightings are one second inside its ends."""
    return main_module.TimeRange(name, start_s, end_s, distance, start_s + 1.0, end_s - 1.0)


@pytest.fixture()
def two_videos(main_module, tmp_path):
    """Two finished videos: three ranges (one without a clip) in the first, nothing in the second."""
    out = tmp_path / "out"
    first = main_module.VideoResult(make_info(main_module), processed_frame_count=60,
                                    sent_frame_count=60, finished=True)
    first.ranges = [make_range(main_module, "Barack_Obama", 0.0, 4.0, 0.412),
                    make_range(main_module, "Barack_Obama", 10.0, 14.5, 0.5),
                    make_range(main_module, "Michelle_Obama", 2.0, 5.0, 0.55)]
    first.clips = [(str(out / "obama_whcd" / "clips" / "0.00s_Barack_Obama_d0.412.mp4"), 0.0),
                   (None, 10.0),
                   (str(out / "obama_whcd" / "clips" / "2.00s_Michelle_Obama_d0.550.mp4"), 2.0)]
    second = main_module.VideoResult(
        make_info(main_module, 1, "/videos/crowd.mp4", "crowd"), processed_frame_count=105,
        sent_frame_count=105, finished=True)
    out.mkdir()
    return out, [first, second]


def read_csv(path):
    """Return results.csv as a list of dicts."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# format_hms ----------------------------------------------------------------------------------
@pytest.mark.parametrize("time_s, expected", [
    (0, "00:00:00.000"),
    (0.0, "00:00:00.000"),
    (3661.5, "01:01:01.500"),
    (5.04, "00:00:05.040"),
    (123.456, "00:02:03.456"),
    (0.0004, "00:00:00.000"),  # rounds down below half a millisecond
    (0.0006, "00:00:00.001"),  # rounds up above it
    (59.9996, "00:01:00.000"),  # rounding carries into the minutes: never '00:00:60.000'
    (3599.9996, "01:00:00.000"),  # ... and into the hours
    (36000, "10:00:00.000"),
    (100 * 3600 + 1.25, "100:00:01.250"),  # hours do not wrap at 24 or 100
])
def test_format_hms_gives_hours_minutes_seconds_and_milliseconds(main_module, time_s, expected):
    """format_hms writes HH:MM:SS.mmm, rounded to the millisecond, carrying into minutes and hours."""
    got = main_module.format_hms(time_s)
    assert got == expected, f"format_hms({time_s}) = {got!r}, expected {expected!r}"


# write_json_atomic ---------------------------------------------------------------------------
def test_write_json_atomic_leaves_valid_json_and_no_part_file(main_module, tmp_path):
    """The JSON reads back equal (non-ASCII names included), and no .part file is left."""
    data = {"people": [{"name": "Zoë Saldaña", "distance": 0.412}], "complete": True, "n": None}
    path = tmp_path / "results.json"
    main_module.write_json_atomic(path, data)
    assert json.loads(path.read_text(encoding="utf-8")) == data, path.read_text(encoding="utf-8")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["results.json"], f"folder holds {left}"


def test_write_json_atomic_replaces_an_existing_file(main_module, tmp_path):
    """Writing again replaces the previous content completely (no leftover tail)."""
    path = tmp_path / "results.json"
    main_module.write_json_atomic(path, {"videos": list(range(1000))})
    main_module.write_json_atomic(path, {"videos": []})
    assert json.loads(path.read_text(encoding="utf-8")) == {"videos": []}, path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# write_reports -------------------------------------------------------------------------------
def test_write_reports_writes_one_csv_row_per_range(main_module, tmp_path, two_videos):
    """results.csv has a header and one row per range of every video, clips relative to the output."""
    out, results = two_videos
    main_module.write_reports(make_run(main_module, main_module.load_settings([])), results, out,
                              main_module.load_settings([]))
    rows = read_csv(out / "results.csv")
    got = [(r["video"], r["name"], r["start_s"], r["end_s"], r["best_distance"], r["clip"],
            r["clip_start_s"]) for r in rows]
    expected = [
        ("/videos/obama_whcd.mp4", "Barack_Obama", "0.0", "4.0", "0.412",
         "obama_whcd/clips/0.00s_Barack_Obama_d0.412.mp4", "0.0"),
        ("/videos/obama_whcd.mp4", "Barack_Obama", "10.0", "14.5", "0.5", "", ""),
        ("/videos/obama_whcd.mp4", "Michelle_Obama", "2.0", "5.0", "0.55",
         "obama_whcd/clips/2.00s_Michelle_Obama_d0.550.mp4", "2.0"),
    ]
    assert got == expected, f"CSV rows {got}"
    left = sorted(p.name for p in out.iterdir())
    assert left == ["index.html", "results.csv", "results.json"], f"output folder holds {left}"


def test_csv_rows_report_distance_and_similarity_consistently(main_module, two_videos):
    """Each CSV row's best_similarity is 1 - best_distance, and the hms columns match the seconds."""
    out, results = two_videos
    main_module.write_reports(make_run(main_module, main_module.load_settings([])), results, out,
                              main_module.load_settings([]))
    wrong = [r for r in read_csv(out / "results.csv")
             if float(r["best_similarity"]) != pytest.approx(1 - float(r["best_distance"]), abs=1e-4)
             or r["start_hms"] != main_module.format_hms(float(r["start_s"]))
             or r["end_hms"] != main_module.format_hms(float(r["end_s"]))]
    assert wrong == [], f"inconsistent rows: {wrong}"


def test_write_reports_json_holds_run_videos_and_ranges(main_module, two_videos):
    """results.json keeps the run fields and lists every video with its status and ranges."""
    out, results = two_videos
    main_module.write_reports(make_run(main_module, main_module.load_settings([]), complete=True),
                              results, out,
                              main_module.load_settings(["--frame-interval", "2"]))
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    summary = [(v["file"], v["status"], v["frame_interval"], len(v["ranges"])) for v in report["videos"]]
    assert (report["tool"], report["complete"]) == ("test", True), f"run fields lost: {report}"
    assert summary == [("/videos/obama_whcd.mp4", "ok", 2, 3), ("/videos/crowd.mp4", "ok", 2, 0)], \
        f"videos {summary}"


def test_every_range_gets_a_csv_row_even_before_its_clip_is_cut(main_module, two_videos):
    """A range whose clip is not cut yet (run interrupted while cutting) is still reported, clip empty."""
    out, results = two_videos
    results[0].clips = results[0].clips[:1]  # Ctrl-C arrived while the second clip was being cut
    main_module.write_reports(make_run(main_module, main_module.load_settings([])), results, out,
                              main_module.load_settings([]))
    rows = read_csv(out / "results.csv")
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    json_ranges = [(r["name"], r["start"], r["clip"]) for r in report["videos"][0]["ranges"]]
    assert [(r["name"], r["start_s"], r["clip"]) for r in rows] == [
        ("Barack_Obama", "0.0", "obama_whcd/clips/0.00s_Barack_Obama_d0.412.mp4"),
        ("Barack_Obama", "10.0", ""), ("Michelle_Obama", "2.0", "")], \
        f"3 ranges but CSV rows {rows}"
    assert len(json_ranges) == 3, f"3 ranges but results.json lists {json_ranges}"


def test_range_report_gives_distance_similarity_and_relative_clip(main_module, tmp_path):
    """A range's JSON entry has rounded seconds, hms, distance, similarity = 1 - distance, clip path."""
    time_range = main_module.TimeRange("Barack_Obama", 12.5, 15.04, 0.41234, 13.0, 14.0)
    entry = main_module.range_report(time_range, str(tmp_path / "v" / "clips" / "c.mp4"), 12.0,
                                     tmp_path)
    got = {k: entry[k] for k in ("name", "start", "end", "start_hms", "end_hms", "best_distance",
                                 "best_similarity", "first_sighting", "last_sighting", "clip",
                                 "clip_start", "clip_starts_early_by")}
    expected = {"name": "Barack_Obama", "start": 12.5, "end": 15.04, "start_hms": "00:00:12.500",
                "end_hms": "00:00:15.040", "best_distance": 0.4123, "best_similarity": 0.5877,
                "first_sighting": 13.0, "last_sighting": 14.0, "clip": "v/clips/c.mp4",
                "clip_start": 12.0, "clip_starts_early_by": 0.5}
    assert got == expected, f"range_report gave {got}"


# video_report status -------------------------------------------------------------------------
@pytest.mark.parametrize("finished, processed, decoded, errors, expected", [
    (True, 60, 60, [], "ok"),  # every frame came back, nothing went wrong
    (False, 30, None, [], "incomplete"),  # interrupted halfway through
    (False, 30, 60, [], "incomplete"),  # decoded, but not every frame came back
    (True, 30, 30, ["x.mp4: decoding stopped after 30 processed frames"], "incomplete"),
    (True, 0, 0, ["x.mp4: decoding stopped after 0 processed frames"], "failed"),
    (False, 0, None, ["x.mp4: cannot be opened"], "failed"),
])
def test_video_report_status_says_ok_incomplete_or_failed(main_module, finished, processed,
                                                          decoded, errors, expected):
    """'ok' = finished without errors; 'incomplete' = some frames processed; 'failed' = none."""
    result = main_module.VideoResult(make_info(main_module), processed_frame_count=processed,
                                     sent_frame_count=decoded, errors=list(errors),
                                     finished=finished)
    status = main_module.video_report(result, main_module.Path("."), 1)["status"]
    assert status == expected, \
        f"finished={finished} processed={processed} decoded={decoded} errors={errors}: {status!r}"


@pytest.mark.parametrize("clips_cut, expected", [(0, "incomplete"), (1, "incomplete"), (2, "ok")])
def test_a_video_is_ok_only_once_every_range_has_its_clip_entry(main_module, clips_cut, expected):
    """A searched video whose clips are still being cut (or were stopped by Ctrl-C) is not "ok"
    yet: only once each range has its clip entry (a clip, or none after an error)."""
    result = main_module.VideoResult(make_info(main_module), processed_frame_count=60,
                                     sent_frame_count=60, finished=True)
    result.ranges = [make_range(main_module, "Barack_Obama", 0.0, 4.0, 0.4),
                     make_range(main_module, "Barack_Obama", 10.0, 14.0, 0.4)]
    result.clips = [("/out/a.mp4", 0.0), (None, None)][:clips_cut]
    assert main_module.video_report(result, main_module.Path("/out"), 1)["status"] == expected


def test_video_report_lists_detections_in_frame_order(main_module):
    """Detections arrive from several workers out of order; the report sorts them by frame, then name."""
    result = main_module.VideoResult(make_info(main_module), finished=True, processed_frame_count=3)
    result.detections = [{"frame": 9, "name": "B"}, {"frame": 2, "name": "B"}, {"frame": 2, "name": "A"}]
    got = [(d["frame"], d["name"]) for d in main_module.video_report(result, main_module.Path("."), 1)["detections"]]
    assert got == [(2, "A"), (2, "B"), (9, "B")], f"detections in order {got}"


# Atomic writes when the disk is full -------------------------------------------------------
def test_a_failed_write_keeps_the_previous_file_whole_and_leaves_no_part(main_module, tmp_path,
                                                                        monkeypatch):
    """Disk full while writing (ENOSPC injected after half the bytes went out): the previous
    results.json stays as it was, no .part is left, and the error names the file (issue #5)."""
    import errno
    from pathlib import Path
    path = tmp_path / "results.json"
    main_module.write_json_atomic(path, {"complete": True, "videos": [1, 2, 3]})
    before = path.read_bytes()
    real_write = Path.write_bytes

    def half_then_full(self, data):
        real_write(self, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))
    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(OSError) as raised:
        main_module.write_json_atomic(path, {"complete": False, "videos": list(range(1000))})
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC
    assert f"cannot write {path}: No space left on device" in str(raised.value), str(raised.value)
    assert path.read_bytes() == before, "the previous complete results.json was damaged"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["results.json"], f"folder holds {left}"


def test_an_interrupted_write_leaves_no_part(main_module, tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) in the middle of a write: the .part is removed too, the previous
    file stays, and the interruption goes on up (issue #5)."""
    import os
    path = tmp_path / "results.json"
    path.write_text("previous")

    def interrupted(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main_module.write_bytes_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_write_to_a_really_full_device_leaves_no_part(main_module, tmp_path):
    """The same with the kernel's own ENOSPC: the .part file is /dev/full (always full)."""
    import errno
    import os
    path = tmp_path / "index.html"
    path.write_text("previous")
    os.symlink("/dev/full", tmp_path / "index.html.part")
    with pytest.raises(OSError) as raised:
        main_module.write_bytes_atomic(path, b"x" * 100_000)
    assert raised.value.errno == errno.ENOSPC, raised.value
    assert "No space left on device" in str(raised.value) and str(path) in str(raised.value)
    assert path.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]


# Resume: what a saved video depends on -------------------------------------------------------
def test_every_setting_is_either_result_changing_or_neutral(main_module):
    """Each setting is listed exactly once: in _RESULT_SETTINGS (a change makes a rerun search the
    video again) or in _NEUTRAL_SETTINGS (speed, folders, debug); a new setting must be sorted in."""
    result, neutral = set(main_module._RESULT_SETTINGS), set(main_module._NEUTRAL_SETTINGS)
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
    result = main_module.VideoResult(make_info(main_module, path=str(video)), processed_frame_count=60,
                                     sent_frame_count=60, finished=True)
    result.ranges = [make_range(main_module, "Barack_Obama", 0.0, 4.0, 0.412)]
    result.clips = [(str(folder / "clips" / "0.00s_Barack_Obama_d0.412.mp4"), 0.0)]
    settings = main_module.load_settings([])
    fingerprint = {"video": main_module.video_fingerprint(str(video)),
                   **main_module.run_fingerprint(settings, [], [])}
    entry = main_module.video_report(result, out, 1)
    snapshots = ["frame_0000005_00000.333s_Barack_Obama.jpg",  # on disk
                 "frame_0000007_00000.467s_Barack_Obama.jpg"]  # reported, but deleted since
    main_module.save_video_results(folder / "video.json", fingerprint, entry, snapshots)
    saved = main_module.read_saved_video(folder / "video.json")
    return saved, fingerprint, folder, out


def test_a_saved_finished_video_with_its_files_is_reusable(main_module, saved_video):
    """video.json holds the entry, the fingerprint, and the snapshots the run reported that are on
    disk (not the others there), with each listed file's size; nothing changed: reusable."""
    saved, fingerprint, folder, out = saved_video
    assert saved["snapshots"] == ["frame_0000005_00000.333s_Barack_Obama.jpg"], saved["snapshots"]
    assert saved["file_bytes"] == {"obama_whcd/frame_0000005_00000.333s_Barack_Obama.jpg": 4,
                                   "obama_whcd/clips/0.00s_Barack_Obama_d0.412.mp4": 4}, saved
    assert saved["fingerprint"] == fingerprint
    assert main_module.reuse_problem(saved, fingerprint, folder, out) is None


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
    problem = main_module.reuse_problem(saved, fingerprint, folder, out)
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
    assert main_module.read_saved_video(path) is None
    path.write_bytes(content)
    with pytest.raises(main_module.BadInput, match="video.json") as raised:
        main_module.read_saved_video(path)
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
    found = sorted(p.relative_to(folder).as_posix() for p in main_module.tool_output_files(folder))
    assert found == sorted(ours), f"found {found}"
    assert main_module.tool_output_files(tmp_path / "missing") == []


def test_saving_new_results_removes_only_what_they_do_not_list(main_module, saved_video):
    """When a video's new results are saved, main.py's files in its folder that they do not list
    (an earlier run's snapshot, a .part left by an interruption) are removed; the listed ones and
    a user's files stay. Until then nothing is removed (issue #5: a rerun stopped early loses
    nothing)."""
    saved, fingerprint, folder, out = saved_video
    (folder / "clips" / "9.00s_Barack_Obama_d0.500.mp4.part").write_bytes(b"half a clip")
    (folder / "notes.txt").write_text("the user's")
    main_module.replace_saved_video(folder / "video.json", fingerprint, saved["entry"],
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
    assert main_module.video_fingerprint(str(copy)) == main_module.video_fingerprint(str(original))
    for offset in (10, len(data) // 2, len(data) - 10):
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        copy.write_bytes(changed)
        assert main_module.video_fingerprint(str(copy)) != \
            main_module.video_fingerprint(str(original)), f"a byte changed at {offset}"
    copy.write_bytes(data + b"x")
    assert main_module.video_fingerprint(str(copy)) != main_module.video_fingerprint(str(original))


def test_the_fingerprint_names_the_providers_and_gpus_that_run_the_models(main_module, monkeypatch):
    """run_fingerprint records the providers PROVIDERS resolves to here whose libraries load
    (onnxruntime-gpu lists TensorRT even where it is not installed) and, with a GPU provider
    among them, the visible GPU models: results made on a GPU are not reused on a CPU-only
    machine, nor CUDA fp32 results where TensorRT fp16 now runs."""
    import onnxruntime
    cpu = main_module.run_fingerprint(main_module.load_settings(["--providers", "cpu"]), [], [])
    assert cpu["execution"] == {"providers": ["CPUExecutionProvider"], "gpus": []}, cpu
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(main_module, "visible_gpu_names", lambda: ["NVIDIA H200", "NVIDIA H200"])
    monkeypatch.setattr(main_module, "provider_library_error",
                        lambda p: "libnvinfer.so.10: cannot open" if p.startswith("Tensorrt") else None)
    gpu = main_module.run_fingerprint(main_module.load_settings(["--providers", "auto"]), [], [])
    assert gpu["execution"] == {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                "gpus": ["NVIDIA H200"]}, gpu
    monkeypatch.setattr(main_module, "provider_library_error", lambda p: None)
    trt = main_module.run_fingerprint(main_module.load_settings(["--providers", "auto"]), [], [])
    assert trt["execution"]["providers"][0] == "TensorrtExecutionProvider", trt
