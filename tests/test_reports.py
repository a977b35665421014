"""Reports (findpeople/reports.py): results.json and results.csv written atomically, one CSV row per
range, index.html rendered in a browser."""
from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import make_info, make_range
from findpeople.clips import TimeRange
from findpeople.references import Reference
from findpeople.reports import (
    color_hex, format_hms, nobody_found_hint, range_report, summary_table, video_report,
    write_json_atomic, write_reports)
from findpeople.run import mark_unfinished, run_header
from findpeople.runstate import RunState, VideoResult


def make_run(main_module, settings, **extra):
    """Return the run-level part of the report, as main() builds it (no photos on disk)."""
    import numpy as np
    people = [Reference(n, [f"/refs/{n}.jpg"], np.zeros((1, 4), np.float32))
              for n in ("Barack_Obama", "Michelle_Obama")]
    return {**run_header(settings, people, None), "tool": "test", **extra}


@pytest.fixture()
def two_videos(main_module, tmp_path):
    """Two finished videos: three ranges (one without a clip) in the first, nothing in the second."""
    out = tmp_path / "out"
    first = VideoResult(make_info(main_module), processed_frame_count=60,
                        sent_frame_count=60, finished=True, searched=True)
    first.ranges = [make_range(main_module, "Barack_Obama", 0.0, 4.0, 0.412),
                    make_range(main_module, "Barack_Obama", 10.0, 14.5, 0.5),
                    make_range(main_module, "Michelle_Obama", 2.0, 5.0, 0.55)]
    first.clips = [(str(out / "obama_whcd" / "clips" / "0.00s_Barack_Obama_d0.412.mp4"), 0.0),
                   (None, 10.0),
                   (str(out / "obama_whcd" / "clips" / "2.00s_Michelle_Obama_d0.550.mp4"), 2.0)]
    second = VideoResult(
        make_info(main_module, 1, "/videos/crowd.mp4", "crowd"), processed_frame_count=105,
        sent_frame_count=105, finished=True, searched=True)
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
    got = format_hms(time_s)
    assert got == expected, f"format_hms({time_s}) = {got!r}, expected {expected!r}"


# write_json_atomic ---------------------------------------------------------------------------
def test_write_json_atomic_leaves_valid_json_and_no_part_file(main_module, tmp_path):
    """The JSON reads back equal (non-ASCII names included), and no .part file is left."""
    data = {"people": [{"name": "Zoë Saldaña", "distance": 0.412}], "complete": True, "n": None}
    path = tmp_path / "results.json"
    write_json_atomic(path, data)
    assert json.loads(path.read_text(encoding="utf-8")) == data, path.read_text(encoding="utf-8")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["results.json"], f"folder holds {left}"


def test_write_json_atomic_replaces_an_existing_file(main_module, tmp_path):
    """Writing again replaces the previous content completely (no leftover tail)."""
    path = tmp_path / "results.json"
    write_json_atomic(path, {"videos": list(range(1000))})
    write_json_atomic(path, {"videos": []})
    assert json.loads(path.read_text(encoding="utf-8")) == {"videos": []}, path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# write_reports -------------------------------------------------------------------------------
def test_write_reports_writes_one_csv_row_per_range(main_module, tmp_path, two_videos):
    """results.csv has a header and one row per range of every video, clips relative to the output."""
    out, results = two_videos
    write_reports(make_run(main_module, main_module.load_settings([])), results, out,
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
    write_reports(make_run(main_module, main_module.load_settings([])), results, out,
                              main_module.load_settings([]))
    wrong = [r for r in read_csv(out / "results.csv")
             if float(r["best_similarity"]) != pytest.approx(1 - float(r["best_distance"]), abs=1e-4)
             or r["start_hms"] != format_hms(float(r["start_s"]))
             or r["end_hms"] != format_hms(float(r["end_s"]))]
    assert wrong == [], f"inconsistent rows: {wrong}"


def test_write_reports_json_holds_run_videos_and_ranges(main_module, two_videos):
    """results.json keeps the run fields and lists every video with its status and ranges."""
    out, results = two_videos
    write_reports(make_run(main_module, main_module.load_settings([]), complete=True),
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
    write_reports(make_run(main_module, main_module.load_settings([])), results, out,
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
    time_range = TimeRange("Barack_Obama", 12.5, 15.04, 0.41234, 13.0, 14.0)
    entry = range_report(time_range, str(tmp_path / "v" / "clips" / "c.mp4"), 12.0,
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
@pytest.mark.parametrize("finished, searched, processed, decoded, errors, expected", [
    (True, True, 60, 60, [], "ok"),  # every frame came back, searched, nothing went wrong
    (True, False, 60, 60, [], "incomplete"),  # indexed, but not searched yet
    (False, False, 30, None, [], "incomplete"),  # interrupted halfway through
    (False, False, 30, 60, [], "incomplete"),  # decoded, but not every frame came back
    (True, True, 30, 30, ["x.mp4: decoding stopped after 30 processed frames"], "incomplete"),
    (True, True, 0, 0, ["x.mp4: decoding stopped after 0 processed frames"], "failed"),
    (False, False, 0, None, ["x.mp4: cannot be opened"], "failed"),
])
def test_video_report_status_says_ok_incomplete_or_failed(main_module, finished, searched, processed,
                                                          decoded, errors, expected):
    """'ok' = indexed to the end, searched, without errors; 'incomplete' = some frames
    processed; 'failed' = none."""
    result = VideoResult(make_info(main_module), processed_frame_count=processed,
                         sent_frame_count=decoded, errors=list(errors), finished=finished,
                         searched=searched)
    status = video_report(result, main_module.Path("."), 1)["status"]
    assert status == expected, (f"finished={finished} searched={searched} processed={processed} "
                                f"decoded={decoded} errors={errors}: {status!r}")


@pytest.mark.parametrize("clips_cut, expected", [(0, "incomplete"), (1, "incomplete"), (2, "ok")])
def test_a_video_is_ok_only_once_every_range_has_its_clip_entry(main_module, clips_cut, expected):
    """A searched video whose clips are still being cut (or were stopped by Ctrl-C) is not "ok"
    yet: only once each range has its clip entry (a clip, or none after an error)."""
    result = VideoResult(make_info(main_module), processed_frame_count=60,
                         sent_frame_count=60, finished=True, searched=True)
    result.ranges = [make_range(main_module, "Barack_Obama", 0.0, 4.0, 0.4),
                     make_range(main_module, "Barack_Obama", 10.0, 14.0, 0.4)]
    result.clips = [("/out/a.mp4", 0.0), (None, None)][:clips_cut]
    assert video_report(result, main_module.Path("/out"), 1)["status"] == expected


def test_a_video_whose_index_was_reused_says_so_in_its_entry_and_the_summary(main_module, two_videos):
    """A video whose index was reused (not decoded again) has "index_reused": true in
    results.json and "(index reused)" after its status in the summary table; the others not."""
    out, results = two_videos
    results[1].index_reused = True
    entries = [video_report(r, out, 1) for r in results]
    assert [e["index_reused"] for e in entries] == [False, True], entries
    table = summary_table(entries, {"/videos/crowd.mp4"}).splitlines()
    crowd = [line for line in table if line.startswith("crowd.mp4")]
    obama = [line for line in table if line.startswith("obama_whcd.mp4")]
    assert crowd and all(line.endswith("ok (index reused)") for line in crowd), table
    assert obama and not any("reused" in line for line in obama), table


def test_video_report_lists_detections_in_frame_order(main_module):
    """Detections arrive from several workers out of order; the report sorts them by frame, then name."""
    result = VideoResult(make_info(main_module), finished=True, processed_frame_count=3)
    result.detections = [{"frame": 9, "name": "B"}, {"frame": 2, "name": "B"}, {"frame": 2, "name": "A"}]
    got = [(d["frame"], d["name"]) for d in video_report(result, main_module.Path("."), 1)["detections"]]
    assert got == [(2, "A"), (2, "B"), (9, "B")], f"detections in order {got}"


# Atomic writes when the disk is full -------------------------------------------------------
def test_a_failed_write_keeps_the_previous_file_whole_and_leaves_no_part(main_module, tmp_path,
                                                                        monkeypatch):
    """Disk full while writing (ENOSPC injected after half the bytes went out): the previous
    results.json stays as it was, no .part is left, and the error names the file (issue #5)."""
    import errno
    from pathlib import Path
    path = tmp_path / "results.json"
    write_json_atomic(path, {"complete": True, "videos": [1, 2, 3]})
    before = path.read_bytes()
    real_write = Path.write_bytes

    def half_then_full(self, data):
        real_write(self, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))
    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(OSError) as raised:
        write_json_atomic(path, {"complete": False, "videos": list(range(1000))})
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC
    assert f"cannot write {path}: No space left on device" in str(raised.value), str(raised.value)
    assert path.read_bytes() == before, "the previous complete results.json was damaged"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["results.json"], f"folder holds {left}"


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
        pixels = colour_pixels(image, color_hex(people.index(name)))
        if name in found:  # a bar 20 px high over at least a fifth of the timeline width
            assert pixels > 20 * 0.2 * bar_width_px, f"{name}: only {pixels} pixels of its colour"
        else:
            assert pixels < 400, f"{name} was not found but its colour covers {pixels} pixels"


# Why nobody was found (issue #11) ------------------------------------------------------------
@pytest.mark.parametrize("counts, expected", [
    ({"faces": 0, "small_faces": 0, "tracks": 0, "looks_per_track": {}}, "no face was detected"),
    ({"faces": 300, "small_faces": 291, "tracks": 12, "looks_per_track": {"0": 12}},
     "97 % of its 300 faces were smaller than MIN_FACE_SIZE (32 px)"),
    ({"faces": 100, "small_faces": 50, "tracks": 4, "looks_per_track": {"5": 4}}, "smaller than MIN_FACE_SIZE"),
    ({"faces": 3, "small_faces": 0, "tracks": 3, "looks_per_track": {"1": 3}},
     "3 of its 3 face tracks were recognised fewer than MIN_TRACK_HITS (2) times"),
    ({"faces": 40, "small_faces": 0, "tracks": 5, "looks_per_track": {"0": 1, "1": 2, "2": 2}},
     "3 of its 5 face tracks were recognised fewer than MIN_TRACK_HITS (2) times"),
    ({"faces": 90, "small_faces": 10, "tracks": 6, "looks_per_track": {"1": 2, "4": 4}}, None),
    ({"faces": 90, "small_faces": 44, "tracks": 6, "looks_per_track": {"1": 2, "4": 4}}, None),
], ids=["no-face", "tiny-faces", "half-small", "short-tracks", "short-mixed", "recognised", "some-small"])
def test_nobody_found_hint_says_when_faces_were_too_small_or_tracks_too_short(main_module, counts,
                                                                           expected):
    """A video that found nobody says why when most of its faces were below MIN_FACE_SIZE (at
    least half), most tracks were recognised fewer than MIN_TRACK_HITS times, or no face was
    seen; faces that were recognised and matched nobody need no hint."""
    hint = nobody_found_hint(counts, main_module.load_settings([]))
    if expected is None:
        assert hint is None, hint
    else:
        assert hint is not None and expected in hint, f"{counts}: {hint!r}"


def test_the_short_track_hint_applies_min_track_hits_at_search_time(main_module):
    """The index keeps how many looks each track had (looks_per_track, keys as JSON reads them
    back or as ints), so the hint follows this run's MIN_TRACK_HITS: tracks of 4 looks are
    short for --min-track-hits 5, not for 4."""
    counts = {"faces": 60, "small_faces": 0, "tracks": 4, "looks_per_track": {4: 3, "9": 1}}
    assert nobody_found_hint(counts, main_module.load_settings(["--min-track-hits", "4"])) is None
    hint = nobody_found_hint(counts, main_module.load_settings(["--min-track-hits", "5"]))
    assert hint is not None and "3 of its 4 face tracks" in hint and "MIN_TRACK_HITS (5)" in hint, hint


def stopped_track(track_id: int, frames: range, look_frames: list, embedding: list) -> dict:
    """Return the record of an ended face track (tracks.track_record) at 15 fps: a 100 px box
    per frame, and a look with this embedding at each of look_frames."""
    faces = np.array([[f, f / 15, 100, 100, 200, 200, 0.9] for f in frames], np.float64)
    return {"track": track_id, "faces": faces,
            "looks": {"frame_idx": np.array(look_frames, np.int64),
                      "kps": np.zeros((len(look_frames), 10), np.float32),
                      "face_size_px": np.full(len(look_frames), 100, np.float32),
                      "embedding": np.array([embedding] * len(look_frames), np.float16)}}


def test_an_interrupted_video_shows_what_was_found_marked_incomplete(main_module, tmp_path):
    """A video stopped midway (Ctrl-C) is searched with the tracks it has ended so far: their
    sightings are ranges without clips, and the summary table and index.html show the person
    found, with the status 'incomplete', never 'nobody found' (issue #11)."""
    settings = main_module.load_settings(["--output", str(tmp_path / "out")])
    (tmp_path / "out").mkdir()
    from conftest import TESTDATA
    from findpeople.runstate import SearchInputs
    people = [Reference(n, [str(TESTDATA / "refs" / f"{n}.jpg")], np.zeros((1, 4), np.float32))
              for n in ("Barack_Obama", "Michelle_Obama")]
    search = SearchInputs(np.eye(2, 4, dtype=np.float32), np.array([0, 1]), [p.name for p in people])
    state = RunState([make_info(main_module)], settings, None, run_header(settings, people, None), search)
    result = state.results[0]
    result.processed_frame_count = 30
    state.record_track(0, stopped_track(0, range(10, 25), [10, 14, 18, 24], [1, 0, 0, 0]))
    mark_unfinished(state, "interrupted")
    state.save_reports()
    entry = video_report(result, state.output_dir, 1)
    assert entry["status"] == "incomplete" and [r["name"] for r in entry["ranges"]] == ["Barack_Obama"], entry
    assert entry["ranges"][0]["clip"] is None, entry["ranges"]
    assert {d["frame"] for d in entry["detections"]} == set(range(10, 25)), entry["detections"]
    table = summary_table([entry], set())
    assert "Barack_Obama" in table and "incomplete" in table and "nobody" not in table, table
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert "Barack_Obama" in page and "nobody found" not in page, page[-2000:]
