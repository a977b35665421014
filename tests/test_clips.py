"""Ranges and clips (findpeople/clips.py): sightings -> half-open ranges -> ffmpeg argument
lists -> clips."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from conftest import TESTDATA, make_video
from findpeople.errors import ClipError
from findpeople.decode import VideoInfo, decode_frames, packet_times_s, probe_video
from findpeople.naming import sighting_flags
from findpeople.clips import (
    TimeRange, build_clip_command, clip_file_name, clip_problem, container_seek_s, cut_clip,
    find_ffmpeg, keyframe_before, merge_sightings, person_ranges, read_clip, run_checked,
    source_video_s, widen_range)
from findpeople.runstate import RunState
from findpeople.run import run_header

HAMILTON = TESTDATA / "videos" / "short_hamilton_clip.mp4"


def make_info(main_module, **changes):
    """Return a VideoInfo built directly: 20 s at 25 fps, video starting with the container."""
    info = VideoInfo(
        idx=0, path="/videos/stage show.mp4", output_name="stage show", width=640, height=360,
        fps=25.0, frame_count=500, duration_s=20.0, time_base=Fraction(1, 12800), origin_pts=0,
        video_start_offset_s=0.0, has_audio=True)
    return dataclasses.replace(info, **changes)


def range_settings(main_module, gap_s: float, before_s: float, after_s: float):
    """Return Settings with the given merge gap and clip margins."""
    return main_module.load_settings([
        "--merge-gap-tolerance", str(gap_s), "--clip-duration-before", str(before_s),
        "--clip-duration-after", str(after_s)])


def time_range(main_module, start_s=12.5, end_s=15.0, name="Barack_Obama", distance=0.412):
    """Return a TimeRange with sightings just inside its margins."""
    return TimeRange(name, start_s, end_s, distance, start_s + 1.0, end_s - 1.0)


# merge_sightings -----------------------------------------------------------------------------
def test_sightings_closer_than_merge_gap_form_one_range(main_module):
    """Sightings 1.0 and 2.5 s with a 2.0 s gap form the single range (1.0, 2.5)."""
    merged = merge_sightings([1.0, 2.5], 2.0)
    assert merged == [(1.0, 2.5)], f"got {merged}"


def test_sightings_exactly_the_merge_gap_apart_split(main_module):
    """Sightings exactly gap_s apart (1.0 and 3.0 with a 2.0 s gap) are two ranges: 'closer than' is strict."""
    merged = merge_sightings([1.0, 3.0], 2.0)
    assert merged == [(1.0, 1.0), (3.0, 3.0)], f"got {merged}"


@pytest.mark.parametrize("times_s, gap_s, expected", [
    ([], 2.0, []),
    ([4.0], 2.0, [(4.0, 4.0)]),
    ([1.0, 2.999], 2.0, [(1.0, 2.999)]),
    ([1.0, 3.0], 2.0, [(1.0, 1.0), (3.0, 3.0)]),
    ([5.0, 1.0, 2.0], 2.0, [(1.0, 2.0), (5.0, 5.0)]),  # unsorted input
    ([0.0, 1.5, 3.0, 4.5], 2.0, [(0.0, 4.5)]),  # the gap counts from the previous sighting
    ([1.0, 1.0, 1.5], 2.0, [(1.0, 1.5)]),  # repeated times (two faces of one person in a frame)
    ([0.0, 0.5, 1.0], 0.25, [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)]),
    ([10.0, 0.0, 9.0, 1.0], 2.0, [(0.0, 1.0), (9.0, 10.0)]),
])
def test_merge_sightings_table(main_module, times_s, gap_s, expected):
    """merge_sightings sorts the times and joins neighbours strictly closer than gap_s."""
    merged = merge_sightings(times_s, gap_s)
    assert merged == expected, f"merge_sightings({times_s}, {gap_s}) = {merged}, expected {expected}"


# widen_range ---------------------------------------------------------------------------------
@pytest.mark.parametrize("first_s, last_s, frame_s, before_s, after_s, duration_s, expected", [
    (5.0, 6.0, 0.04, 2.0, 2.0, 20.0, (3.0, 8.04)),
    (1.0, 2.0, 0.04, 2.0, 2.0, 20.0, (0.0, 4.04)),  # start clamped to 0
    (18.0, 19.0, 0.04, 2.0, 2.0, 20.0, (16.0, 20.0)),  # end clamped to the duration
    (0.0, 0.0, 0.04, 0.0, 0.0, 10.0, (0.0, 0.04)),  # one frame after the last sighting
    (9.96, 9.96, 0.04, 0.0, 0.0, 10.0, (9.96, 10.0)),  # the last frame reaches the end exactly
    (4.0, 4.0, 1 / 29.97, 0.0, 0.0, 9.0, (4.0, 4.0 + 1 / 29.97)),
    (2.9333, 2.9333, 0.1, 0.0, 0.0, 3.0, (2.9333, 3.0)),  # VFR: 1 / average fps is past the end
    (2.9333, 2.9333, 0.1, 0.0, 2.0, 3.0, (2.9333, 3.0)),
])
def test_widen_range_adds_margins_and_one_frame_clamped_to_the_video(
        main_module, first_s, last_s, frame_s, before_s, after_s, duration_s, expected):
    """The range is [first - before, last + one frame + after), clamped to [0, duration]."""
    got = widen_range(first_s, last_s, frame_s, before_s, after_s, duration_s)
    assert got == pytest.approx(expected), \
        f"widen_range({first_s}, {last_s}, {frame_s}, {before_s}, {after_s}, {duration_s}) = {got}"
    assert 0.0 <= got[0] <= got[1] <= duration_s, f"{got} is outside [0, {duration_s}]"


@pytest.mark.parametrize("duration_s", [4.0, 5.0])
def test_a_duration_that_ends_before_the_last_sighting_is_not_trusted(main_module, duration_s):
    """A header duration at or before the last sighting (a wrong header) does not cut the range:
    it ends one frame after the last sighting."""
    got = widen_range(5.0, 5.0, 0.04, 0.0, 2.0, duration_s)
    assert got == pytest.approx((5.0, 5.04)), f"widen_range(..., {duration_s}) = {got}"


def test_widened_range_includes_the_last_sighting_s_frame(main_module):
    """Half-open [start, end): the frame of the last sighting lies inside, so end > last_s."""
    start_s, end_s = widen_range(3.0, 3.0, 0.04, 0.0, 0.0, 20.0)
    assert start_s <= 3.0 < end_s and end_s == pytest.approx(3.04), f"range [{start_s}, {end_s})"


# person_ranges -------------------------------------------------------------------------------
def test_person_ranges_gives_one_range_per_cluster_with_its_own_best_distance(main_module):
    """Two clusters 8.5 s apart give two ranges; each best_distance is the min inside that range."""
    info = make_info(main_module)
    sightings = [(10.0, 0.45), (1.0, 0.5), (1.5, 0.4), (10.5, 0.30)]
    ranges = person_ranges("Lin_Manuel_Miranda", sightings, info,
                                       range_settings(main_module, 2.0, 1.0, 1.0))
    got = [(r.name, r.start_s, r.end_s, r.best_distance, r.first_sighting_s, r.last_sighting_s)
           for r in ranges]
    expected = [("Lin_Manuel_Miranda", 0.0, 2.54, 0.4, 1.0, 1.5),
                ("Lin_Manuel_Miranda", 9.0, 11.54, 0.30, 10.0, 10.5)]
    assert len(got) == 2 and all(g == pytest.approx(e) for g, e in zip(got, expected)), \
        f"ranges {got}, expected {expected}"


def test_overlapping_widened_ranges_merge_into_one(main_module):
    """Sightings 3 s apart (gap 2 s) widened by 2 s each side overlap, so they form one range."""
    info = make_info(main_module)
    ranges = person_ranges("Barack_Obama", [(5.0, 0.5), (8.0, 0.3)], info,
                                       range_settings(main_module, 2.0, 2.0, 2.0))
    got = [(r.start_s, r.end_s, r.best_distance, r.first_sighting_s, r.last_sighting_s) for r in ranges]
    assert len(got) == 1 and got[0] == pytest.approx((3.0, 10.04, 0.3, 5.0, 8.0)), f"ranges {got}"


def test_ranges_that_do_not_overlap_after_widening_stay_apart(main_module):
    """Sightings 3 s apart widened by 1 s each side ([4, 6.04) and [7, 9.04)) stay two ranges."""
    info = make_info(main_module)
    ranges = person_ranges("Barack_Obama", [(5.0, 0.5), (8.0, 0.3)], info,
                                       range_settings(main_module, 2.0, 1.0, 1.0))
    got = [(r.start_s, r.end_s, r.best_distance) for r in ranges]
    assert len(got) == 2 and got[0] == pytest.approx((4.0, 6.04, 0.5)) \
        and got[1] == pytest.approx((7.0, 9.04, 0.3)), f"ranges {got}"


def test_person_ranges_are_clamped_to_the_video(main_module):
    """Ranges near both ends stay within [0, duration_s]."""
    info = make_info(main_module, duration_s=12.0)
    ranges = person_ranges("Michelle_Obama", [(0.2, 0.5), (11.9, 0.4)], info,
                                       range_settings(main_module, 2.0, 2.0, 2.0))
    got = [(r.start_s, r.end_s) for r in ranges]
    assert len(got) == 2 and got[0] == pytest.approx((0.0, 2.24)) \
        and got[1] == pytest.approx((9.9, 12.0)), f"ranges {got}, expected [(0, 2.24), (9.9, 12)]"


def test_person_ranges_of_no_sightings_is_empty(main_module):
    """No sightings, no ranges."""
    ranges = person_ranges("Nobody", [], make_info(main_module),
                                       range_settings(main_module, 2.0, 2.0, 2.0))
    assert ranges == [], f"ranges {ranges}"


# clip_file_name ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, start_s, distance, expected", [
    ("Barack_Obama", 12.5, 0.412, "12.50s_Barack_Obama_d0.412.mp4"),
    ("Lin_Manuel_Miranda", 0.0, 0.5, "0.00s_Lin_Manuel_Miranda_d0.500.mp4"),
    ("Michelle_Obama", 125.126, 0.0614, "125.13s_Michelle_Obama_d0.061.mp4"),
    ("AC/DC: Live?", 1.0, 0.3, "1.00s_AC_DC_ Live__d0.300.mp4"),
    ('a<b>c"d\\e|f*g', 1.0, 0.3, "1.00s_a_b_c_d_e_f_g_d0.300.mp4"),
    ("tab\there", 1.0, 0.3, "1.00s_tab_here_d0.300.mp4"),
])
def test_clip_file_name_is_start_name_and_distance(main_module, name, start_s, distance, expected):
    """Clip names read '[StartSec]s_[Name]_d[Distance].mp4', unsafe characters replaced by '_'."""
    got = clip_file_name(time_range(main_module, start_s, start_s + 4, name, distance))
    assert got == expected, f"clip_file_name for {name!r} at {start_s} s, d={distance}: {got!r}"
    assert Path(got).name == got, f"{got!r} would leave the clip folder"


# container_seek_s ----------------------------------------------------------------------------
@pytest.mark.parametrize("time_s, offset_s, expected", [
    (5.04, 0.844, 5.884),  # Hamilton: the video starts 0.844 s after the container
    (0.0, 0.844, 0.844),
    (3.0, 0.0, 3.0),
    (0.1, -0.5, 0.0),  # never negative
    (0.0, -0.01, 0.0),
    (2.0, -0.5, 1.5),
])
def test_container_seek_adds_the_video_start_offset(main_module, time_s, offset_s, expected):
    """ffmpeg's -ss = frame time + video_start_offset_s, never below 0."""
    got = container_seek_s(time_s, make_info(main_module, video_start_offset_s=offset_s))
    assert got == pytest.approx(expected), f"seek for {time_s} s with offset {offset_s}: {got}"


def test_hamilton_frame_zero_seeks_to_its_late_video_start(main_module):
    """In the Hamilton clip, frame time 0 is container time 0.844 s."""
    info = probe_video(HAMILTON, 0, HAMILTON.stem)
    got = container_seek_s(0.0, info)
    assert got == pytest.approx(0.844, abs=1e-3), f"seek for frame time 0: {got}"


# build_clip_command --------------------------------------------------------------------------
@pytest.fixture()
def clip_command(main_module):
    """The command for [5.04, 8.5) of a video whose stream starts 0.844 s late (path has a space)."""
    info = make_info(main_module, video_start_offset_s=0.844)
    part = Path("/out/stage show/clips/5.04s_X_d0.400.mp4.part")
    return build_clip_command("/opt/ffmpeg", info, time_range(main_module, 5.04, 8.5),
                                          part), info, part


def option_value(cmd: list, option: str) -> str:
    """Return the argument after an option."""
    assert option in cmd, f"{option} missing from {cmd}"
    return cmd[cmd.index(option) + 1]


def test_clip_command_is_a_list_of_strings(clip_command):
    """The command is an argument list of str starting with the ffmpeg path, never a shell string."""
    cmd, info, part = clip_command
    assert isinstance(cmd, list) and all(isinstance(a, str) for a in cmd), f"not a list of str: {cmd!r}"
    assert cmd[0] == "/opt/ffmpeg", f"program {cmd[0]!r}"
    assert info.path in cmd and str(part) in cmd, f"paths with spaces must be single arguments: {cmd}"
    assert "-nostdin" in cmd and "-y" in cmd, f"missing -nostdin/-y: {cmd}"


def test_clip_command_seeks_before_the_input_on_the_container_clock(clip_command):
    """-ss comes before -i (fast seek) and is the range start plus the stream offset: 5.884."""
    cmd, info, _ = clip_command
    assert cmd.index("-ss") < cmd.index("-i"), f"-ss after -i: {cmd}"
    assert (option_value(cmd, "-ss"), option_value(cmd, "-i")) == ("5.884", info.path), f"{cmd}"


def test_clip_command_gives_the_duration_with_t(clip_command):
    """-t is the range's duration (8.5 - 5.04 = 3.460 s), not its end time."""
    cmd, _, _ = clip_command
    assert option_value(cmd, "-t") == "3.460" and "-to" not in cmd, f"{cmd}"
    assert cmd.index("-t") > cmd.index("-i"), f"-t should limit the output: {cmd}"


def test_clip_command_maps_the_video_and_optional_audio(clip_command):
    """It maps the first video stream and, optionally ('?'), audio, so silent videos still cut."""
    cmd, _, _ = clip_command
    maps = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-map"]
    assert "0:v:0" in maps, f"maps {maps}"
    assert any(m in ("0:a:0?", "0:a?") for m in maps), f"no optional audio map in {maps}"


def test_clip_command_writes_the_part_file_as_mp4(clip_command):
    """The output is the .part path (renamed later), with the format given since .part says nothing."""
    cmd, _, part = clip_command
    assert cmd[-1] == str(part), f"last argument {cmd[-1]!r}, expected {str(part)!r}"
    assert option_value(cmd, "-f") == "mp4", f"{cmd}"


# run_checked ---------------------------------------------------------------------------------
def test_run_checked_raises_clip_error_with_exit_code_and_stderr(main_module, ffmpeg_exe, tmp_path):
    """A failing ffmpeg (missing input) raises ClipError naming what, the exit code and stderr."""
    missing = tmp_path / "missing.mp4"
    cmd = [ffmpeg_exe, "-nostdin", "-v", "error", "-i", str(missing), "-f", "null", "-"]
    expected_code = subprocess.run(cmd, capture_output=True).returncode
    with pytest.raises(ClipError) as caught:
        run_checked(cmd, what="missing.mp4 1.00-2.00s")
    message = str(caught.value)
    assert expected_code != 0 and f"exit code {expected_code}" in message, \
        f"exit code {expected_code} not in {message!r}"
    assert "missing.mp4 1.00-2.00s" in message and "No such file" in message, f"{message!r}"


def test_run_checked_keeps_only_the_last_lines_of_stderr(main_module):
    """The error carries stderr's tail: the last line is there, the first is not."""
    script = "import sys\nfor i in range(40): print(f'line {i:02d}', file=sys.stderr)\nsys.exit(3)"
    with pytest.raises(ClipError) as caught:
        run_checked([sys.executable, "-c", script], what="tail test")
    message = str(caught.value)
    assert "exit code 3" in message and "line 39" in message and "line 00" not in message, \
        f"{message!r}"


def test_run_checked_turns_a_missing_program_into_clip_error(main_module, tmp_path):
    """A program that cannot start raises ClipError naming it, not a bare OSError."""
    program = str(tmp_path / "no-such-ffmpeg")
    with pytest.raises(ClipError, match="no-such-ffmpeg"):
        run_checked([program, "-version"], what="x.mp4 0.00-1.00s")


def test_run_checked_turns_a_timeout_into_clip_error(main_module):
    """A command running past its timeout is stopped and raises ClipError naming what ran."""
    with pytest.raises(ClipError, match="slow.mp4"):
        run_checked([sys.executable, "-c", "import time; time.sleep(30)"],
                                what="slow.mp4 0.00-1.00s", timeout_s=0.5)


def test_run_checked_kills_the_command_when_asked_to_stop(main_module):
    """Setting the stop event (Ctrl-C) kills a running ffmpeg and raises ClipError 'stopped'."""
    import threading
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(ClipError, match="stopped"):
        run_checked([sys.executable, "-c", "import time; time.sleep(30)"],
                                what="long.mp4 0.00-9.00s", stop_event=stop)


def test_run_checked_returns_quietly_on_success(main_module):
    """Exit code 0 raises nothing."""
    assert run_checked([sys.executable, "-c", "pass"], what="ok") is None


# find_ffmpeg ---------------------------------------------------------------------------------
def fake_program(folder: Path, name: str) -> Path:
    """Create an executable shell script that exits 0."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("name", ["ffmpeg", "ffmpeg.exe"])
def test_find_ffmpeg_prefers_the_local_folder_over_path(main_module, tmp_path, monkeypatch, name):
    """FFMPEG_DIR/ffmpeg(.exe) wins over an ffmpeg on PATH."""
    local = fake_program(tmp_path / "local", name)
    fake_program(tmp_path / "bin", "ffmpeg")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    got = find_ffmpeg(str(tmp_path / "local"))
    assert got == str(local.resolve()), f"find_ffmpeg chose {got}, expected {local}"


@pytest.mark.parametrize("local_folder", ["empty", "missing"])
def test_find_ffmpeg_falls_back_to_path(main_module, tmp_path, monkeypatch, local_folder):
    """With no ffmpeg in FFMPEG_DIR (empty or missing folder), the one on PATH is used."""
    (tmp_path / "empty").mkdir()
    on_path = fake_program(tmp_path / "bin", "ffmpeg")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    got = find_ffmpeg(str(tmp_path / local_folder))
    assert got is not None and Path(got).resolve() == on_path.resolve(), \
        f"find_ffmpeg chose {got}, expected {on_path}"


# cut_clip on real media ----------------------------------------------------------------------
def decoded_frames(path: Path, count: int | None = None) -> list:
    """Return the first count (or all) video frames of a file as BGR arrays, decoded with PyAV."""
    import av
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="bgr24"))
            if count is not None and len(frames) == count:
                break
    return frames


@pytest.fixture(scope="module")
def hamilton_clip(main_module, ffmpeg_exe, tmp_path_factory):
    """The clip [5.04, 7.04) cut from the Hamilton video, with its folder and probe."""
    info = probe_video(HAMILTON, 0, HAMILTON.stem)
    clip_dir = tmp_path_factory.mktemp("clips")
    span = TimeRange("Lin_Manuel_Miranda", 5.04, 7.04, 0.41, 5.5, 6.0)
    return cut_clip(ffmpeg_exe, info, span, clip_dir), clip_dir, info, span


def test_cut_clip_writes_the_named_clip_and_no_part_file(main_module, hamilton_clip):
    """cut_clip leaves exactly the final clip, named by clip_file_name, and no .part file."""
    clip, clip_dir, _, span = hamilton_clip
    names = sorted(p.name for p in clip_dir.iterdir())
    assert names == [clip_file_name(span)] and clip == clip_dir / names[0], \
        f"clip folder holds {names}; cut_clip returned {clip}"


def test_cut_clip_keeps_video_and_audio(hamilton_clip):
    """The clip has a video stream and the source's audio stream, and lasts the range (2 s)."""
    import av
    clip, _, _, span = hamilton_clip
    with av.open(str(clip)) as container:
        video_count, audio_count = len(container.streams.video), len(container.streams.audio)
        stream = container.streams.video[0]
        video_s = float(stream.duration * stream.time_base) if stream.duration else 0.0
    assert (video_count, audio_count) == (1, 1), f"{clip.name}: {video_count} video, {audio_count} audio"
    assert video_s == pytest.approx(span.end_s - span.start_s, abs=0.1), f"video lasts {video_s} s"


def test_cut_clip_starts_at_the_frame_of_the_range_start(main_module, hamilton_clip):
    """The clip's first frame is the source frame at 5.04 s (index 151 or 152), not 0.844 s earlier."""
    clip, _, info, span = hamilton_clip
    first = decoded_frames(clip, 1)[0].astype(np.int16)
    source = decoded_frames(HAMILTON, 200)
    differences = [float(np.abs(frame.astype(np.int16) - first).mean()) for frame in source]
    closest = int(np.argmin(differences))
    expected = round(span.start_s * info.fps)  # 151; frame 152 starts at 5.072 s
    assert abs(closest - expected) <= 1 and closest in (151, 152), \
        f"clip starts at source frame {closest} (mean abs difference {differences[closest]:.2f}), " \
        f"expected {expected}±1; differences near it: " \
        f"{ {i: round(differences[i], 2) for i in range(max(0, closest - 3), closest + 4)} }"


def test_failed_cut_raises_clip_error_and_leaves_no_part_file(main_module, ffmpeg_exe, tmp_path):
    """A cut that fails raises ClipError and leaves neither a clip nor a .part file behind."""
    info = make_info(main_module, path=str(tmp_path / "gone.mp4"))
    clip_dir = tmp_path / "clips"
    with pytest.raises(ClipError, match="gone.mp4"):
        cut_clip(ffmpeg_exe, info, time_range(main_module, 1.0, 2.0), clip_dir)
    left = sorted(os.listdir(clip_dir))
    assert left == [], f"left behind: {left}"


# CLIP_MODE ------------------------------------------------------------------------------------
def first_frames_match(main_module, clip_path, source_path, expected_time_s):
    """Return (index of the source frame the clip's first frame equals best, expected index)."""
    import av
    info = probe_video(Path(source_path), 0, "src")
    frames = [(t, img.astype(np.int16)) for _, t, img in decode_frames(info, 1)]
    with av.open(str(clip_path)) as container:
        first = next(container.decode(video=0)).to_ndarray(format="bgr24").astype(np.int16)
    errors = [np.abs(first - img).mean() for _, img in frames]
    expected = min(range(len(frames)), key=lambda i: abs(frames[i][0] - expected_time_s))
    return int(np.argmin(errors)), expected


def stream_types(path):
    done = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type", "-of",
                           "csv=p=0", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return sorted(done.stdout.split())


@pytest.mark.parametrize("mode, start_s, expected_start_s", [
    ("accurate", 5.04, 5.04),  # re-encoded: the range's own first frame
    ("fast", 5.04, 4.004),  # stream copy: the keyframe before 5.04 s (keyframes 4.004, 5.439)
    ("fast", 211 * 100 / 2997, 211 * 100 / 2997),  # starting on a keyframe (frame 211): there
])
def test_clip_modes_start_where_the_report_says_and_keep_audio(main_module, ffmpeg_exe, tmp_path,
                                                               mode, start_s, expected_start_s):
    """accurate clips start on the range's first frame; fast clips on the keyframe at or before
    it, which keyframe_before reports; both keep the audio (ffprobe)."""
    source = TESTDATA / "videos" / "short_hamilton_clip.mp4"
    info = probe_video(source, 0, "hamilton")
    time_range = TimeRange("Lin_Manuel_Miranda", start_s, start_s + 1.5, 0.5, start_s,
                                       start_s + 1.0)
    clip_start_s = start_s
    if mode == "fast":
        clip_start_s = keyframe_before(packet_times_s(info, keyframes_only=True), start_s)
        assert clip_start_s == pytest.approx(expected_start_s, abs=1e-3), clip_start_s
    clip = cut_clip(ffmpeg_exe, info, time_range, tmp_path, mode, clip_start_s)
    assert stream_types(clip) == ["audio", "video"], f"{mode} clip streams"
    shown, expected = first_frames_match(main_module, clip, source, expected_start_s)
    assert abs(shown - expected) <= 1, f"{mode} clip starts at frame {shown}, expected {expected}"


@pytest.mark.parametrize("rec_count", [1, 10, 3000])
def test_sighting_flags_on_a_one_hour_track_follow_the_rule(rec_count):
    """On a one-hour track (90 000 frames) every frame is judged, and the single-pass result equals
    the rule applied frame by frame (checked on a sample)."""
    frames = 90_000
    step = frames // rec_count
    rec_at = [i // step if i % step == 0 and i // step < rec_count else None for i in range(frames)]
    confirms = [k % 7 != 3 for k in range(rec_count)]
    flags = sighting_flags(rec_at, confirms, 1)
    assert len(flags) == frames
    positions = [i for i, r in enumerate(rec_at) if r is not None]
    for i in range(0, frames, 997):  # brute force on a sample
        before = [p for p in positions if p <= i]
        after = [p for p in positions if p >= i]
        if before and after:
            want = confirms[rec_at[before[-1]]] and confirms[rec_at[after[0]]]
        elif before:
            want = confirms[rec_at[before[-1]]] and i - before[-1] <= 1
        else:
            want = confirms[rec_at[after[0]]] and after[0] - i <= 1
        assert flags[i] == want, f"frame {i}"


def test_fast_mode_re_encodes_a_clip_mp4_cannot_hold_as_it_is(main_module, ffmpeg_exe, tmp_path):
    """An AVI with PCM audio cannot be stream-copied into MP4: the clip is re-encoded instead, and
    the report gets the start it really has (the range's own start)."""
    source = tmp_path / "pcm.avi"
    subprocess.run([ffmpeg_exe, "-nostdin", "-v", "error", "-f", "lavfi", "-i",
                    "testsrc=size=160x120:rate=10", "-f", "lavfi", "-i", "sine=frequency=440",
                    "-t", "4", "-c:v", "mjpeg", "-c:a", "pcm_s16le", str(source)], check=True)
    settings = main_module.load_settings(["--clip-mode", "fast", "--output", str(tmp_path / "out")])
    info = probe_video(source, 0, "pcm")
    state = RunState([info], settings, ffmpeg_exe,
                                 run_header(settings, [], ffmpeg_exe))
    time_range = TimeRange("Alice", 1.5, 3.0, 0.4, 1.5, 2.5)
    result = state.results[0]
    clip, start_s = state.cut_one(result, time_range, tmp_path / "clips", 1.0)
    assert clip is not None and Path(clip).is_file(), result.errors
    assert start_s == 1.5, f"a re-encoded clip starts at the range start, not {start_s}"
    assert stream_types(clip) == ["audio", "video"]


# Clips are checked before they are called done; any frame size is cut (issue #11) ------------
MPEG4 = ["-c:v", "mpeg4", "-q:v", "3"]  # MPEG-4 Part 2 takes odd sizes in 4:2:0; libx264 does not
H264_444 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv444p"]
ONE_AND_A_HALF = TimeRange("Alice", 1.0, 2.5, 0.4, 1.0, 2.0)  # frames 25..62 at 25 fps: 1.52 s


def clip_facts(path: Path) -> dict:
    """Return what a clip shows: its stream types (ffprobe), its first frame's size and rotation,
    and how long its video lasts (read_clip)."""
    import av
    with av.open(str(path)) as container:
        first = next(container.decode(video=0))
    return {"streams": stream_types(path), "size": (first.width, first.height),
            "rotation": first.rotation, "video_s": read_clip(path)[2]}


def starting_frame(clip: Path, source: Path) -> int:
    """Return the index of the source frame (as displayed, cropped to the clip's size) that the
    clip's first frame is most like."""
    import av
    with av.open(str(clip)) as container:
        first = next(container.decode(video=0)).to_ndarray(format="bgr24").astype(np.int16)
    height, width = first.shape[:2]
    frames = [img[:height, :width].astype(np.int16)
              for _, _, img in decode_frames(probe_video(source, 0, "source"), 1)]
    return int(np.argmin([np.abs(first - img).mean() for img in frames]))


def assert_plays_from(clip: Path, source: Path, size: tuple, streams: list, first_frame: int,
                      video_s: float = 1.52) -> None:
    """Assert a clip has the given streams, an upright first frame of the given size, video
    lasting video_s within two frames (25 fps), and starts on the given source frame (+-1)."""
    facts = clip_facts(clip)
    assert (facts["streams"], facts["size"], facts["rotation"]) == (streams, size, 0), facts
    assert abs(facts["video_s"] - video_s) <= 0.08, f"{clip.name}: {facts}, expected {video_s} s"
    shown = starting_frame(clip, source)
    assert abs(shown - first_frame) <= 1, f"{clip.name} starts at frame {shown}, not {first_frame}"


def set_rotation(ffmpeg_exe: str, source: Path, target: Path, degrees: int) -> Path:
    """Copy a video with a display matrix that turns it degrees counter-clockwise: with
    -display_rotation on ffmpeg >= 6.1, else with the 'rotate' tag ffmpeg 5.1 turns into one."""
    for how in (["-display_rotation", str(degrees), "-i", source],
                ["-i", source, "-metadata:s:v:0", f"rotate={degrees}"]):
        done = subprocess.run([ffmpeg_exe, "-nostdin", "-v", "error", "-y", *map(str, how),
                               "-c", "copy", str(target)], capture_output=True, text=True)
        if done.returncode == 0 and probe_video(target, 0, "x").rotation_deg == degrees:
            return target
    raise AssertionError(f"{ffmpeg_exe} cannot write a display rotation of {degrees} degrees")


@pytest.mark.parametrize("size, degrees, codec, even_size", [
    ("845x613", 0, MPEG4, (844, 612)),  # both odd: the last column and row are cropped
    ("845x614", 0, H264_444, (844, 614)),  # odd width only
    ("844x613", 0, MPEG4, (844, 612)),  # odd height only
    ("613x845", 90, MPEG4, (844, 612)),  # stored on its side: the displayed size is cropped
], ids=["845x613", "845x614", "844x613", "613x845 turned"])
def test_an_accurate_clip_of_any_frame_size_is_cropped_to_even_and_plays(
        main_module, ffmpeg_exe, tmp_path, size, degrees, codec, even_size):
    """libx264 in yuv420p needs even sizes: an odd displayed width or height loses its last column
    or row, after the rotation; the clip plays upright, with audio, from the range's first frame."""
    source = make_video(ffmpeg_exe, tmp_path / "odd.mp4", size, *codec, "-c:a", "aac")
    if degrees:
        source = set_rotation(ffmpeg_exe, source, tmp_path / "turned.mp4", degrees)
    info = probe_video(source, 0, "odd")
    clip = cut_clip(ffmpeg_exe, info, ONE_AND_A_HALF, tmp_path / "clips")
    assert_plays_from(clip, source, even_size, ["audio", "video"], 25)


def test_build_clip_command_crops_accurate_clips_to_an_even_size_and_copies_fast_ones(clip_command):
    """The accurate command crops to even sizes (a no-op for even ones); the fast one filters nothing."""
    cmd, info, part = clip_command
    assert option_value(cmd, "-vf") == "crop=trunc(iw/2)*2:trunc(ih/2)*2:0:0", cmd
    fast = build_clip_command("/opt/ffmpeg", info, ONE_AND_A_HALF, part, "fast", 0.96)
    assert "-vf" not in fast and option_value(fast, "-c") == "copy", fast


def test_the_safe_clip_command_seeks_after_the_input(clip_command):
    """seek="output" puts -ss after -i (decode from the start, drop frames before it), same times."""
    cmd, info, part = clip_command
    safe = build_clip_command("/opt/ffmpeg", info, time_range(None, 5.04, 8.5), part, seek="output")
    assert safe.index("-i") < safe.index("-ss") < safe.index("-t"), safe
    assert [option_value(safe, o) for o in ("-ss", "-t")] == ["5.884", "3.460"], safe
    assert sorted(safe) == sorted(cmd), f"{safe} is not {cmd} reordered"


def fast_state(main_module, ffmpeg_exe: str, source: Path, tmp_path: Path):
    """Return (RunState, its VideoResult) for one video with CLIP_MODE fast."""
    settings = main_module.load_settings(["--clip-mode", "fast", "--output", str(tmp_path / "out")])
    state = RunState([probe_video(source, 0, source.stem)], settings, ffmpeg_exe,
                     run_header(settings, [], ffmpeg_exe))
    return state, state.results[0]


def test_fast_mode_re_encodes_an_odd_sized_clip_mp4_cannot_hold_as_it_is(main_module, ffmpeg_exe,
                                                                         tmp_path):
    """An odd-sized MJPEG AVI with PCM audio cannot be copied into MP4: its clip is re-encoded,
    cropped to an even size, and starts at the range's start, as the report says."""
    source = make_video(ffmpeg_exe, tmp_path / "odd pcm.avi", "845x613", "-c:v", "mjpeg",
                        "-q:v", "3", "-c:a", "pcm_s16le")
    state, result = fast_state(main_module, ffmpeg_exe, source, tmp_path)
    clip, start_s = state.cut_one(result, ONE_AND_A_HALF, tmp_path / "clips", 0.96)
    assert clip is not None and result.errors == [], result.errors
    assert start_s == 1.0, f"a re-encoded clip starts at the range start, not {start_s}"
    assert_plays_from(Path(clip), source, (844, 612), ["audio", "video"], 25)


def raw_h264(ffmpeg_exe: str, path: Path) -> Path:
    """Write an H.264 elementary stream (no container: no index, no timestamps) named path."""
    return make_video(ffmpeg_exe, path, "320x240", "-c:v", "libx264", "-preset", "ultrafast",
                      "-pix_fmt", "yuv420p", "-g", "25", "-f", "h264", audio=False)


@pytest.mark.parametrize("mode", ["accurate", "fast"])
def test_a_raw_h264_stream_named_mp4_gives_a_clip_that_plays(main_module, ffmpeg_exe, tmp_path,
                                                             monkeypatch, mode):
    """ffmpeg exits 0 but writes an MP4 without video when it seeks in a raw H.264 stream: the
    clip is checked, cut again decoding from the start, and plays from the range's first frame
    (a fast clip too: it is re-encoded, and its start is the range's). The probe refuses such a
    stream (test_decode.py); here it is let through, to test the clip's own safety net."""
    monkeypatch.setattr("findpeople.decode.refuse_raw_stream", lambda *args, **kwargs: None)
    source = raw_h264(ffmpeg_exe, tmp_path / "camera.mp4")
    state, result = fast_state(main_module, ffmpeg_exe, source, tmp_path)
    if mode == "fast":
        clip, start_s = state.cut_one(result, ONE_AND_A_HALF, tmp_path / "clips", 0.0)
        assert clip is not None and start_s == 1.0, (clip, start_s, result.errors)
        clip = Path(clip)
    else:
        clip = cut_clip(ffmpeg_exe, result.info, ONE_AND_A_HALF, tmp_path / "clips")
    assert_plays_from(clip, source, (320, 240), ["video"], 25)
    assert sorted(p.name for p in clip.parent.iterdir()) == [clip.name], "a .part was left"


def test_an_mpeg_ts_with_one_keyframe_gives_an_accurate_clip_that_plays(main_module, ffmpeg_exe,
                                                                         tmp_path):
    """An MPEG-TS recording whose only keyframe is its first frame (no index; a long GOP or
    intra refresh): seeking before the input finds no keyframe, and ffmpeg exits 0 with an MP4
    without video; cut again decoding from the start, the clip plays from the range's first frame."""
    source = make_video(ffmpeg_exe, tmp_path / "recording.ts", "320x240", "-c:v", "libx264",
                        "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "1000", "-c:a", "aac")
    info = probe_video(source, 0, "recording")
    assert packet_times_s(info, keyframes_only=True) == [0.0], "not the case tested"
    clip = cut_clip(ffmpeg_exe, info, ONE_AND_A_HALF, tmp_path / "clips")
    assert_plays_from(clip, source, (320, 240), ["audio", "video"], 25)


FAKE_FFMPEG = """#!{python}
import subprocess, sys
args = sys.argv[1:]
with open({log!r}, "a") as log:
    print(" ".join(args), file=log)
first_try = args.index("-ss") < args.index("-i")
if {always} or first_try:
    if {how!r} == "no video":  # a valid MP4 holding the audio alone
        args = [a for a in args if not a.startswith("0:v")]
        args[args.index("-map")] = "-vn"
    elif {how!r} == "one frame":
        args[-1:-1] = ["-frames:v", "1"]
    else:  # a few bytes that are no MP4 at all
        open(args[-1], "wb").write(bytes(262))
        sys.exit(0)
sys.exit(subprocess.call([{ffmpeg!r}] + args))
"""
BROKEN = {"no video": "has no video stream", "262 bytes": "cannot be read",
          "one frame": "has 0.040 s of video where the video has 1.520 s"}


def fake_ffmpeg(folder: Path, ffmpeg_exe: str, how: str, always: bool) -> tuple:
    """Return (an ffmpeg that exits 0 after writing a broken clip, the first time or always, as
    `how` says, else runs the real one; the file that logs its calls)."""
    log, program = folder / "calls.log", folder / "ffmpeg"
    program.write_text(FAKE_FFMPEG.format(python=sys.executable, log=str(log), always=always,
                                          how=how, ffmpeg=ffmpeg_exe))
    program.chmod(0o755)
    return str(program), log


@pytest.mark.parametrize("how", BROKEN)
def test_a_clip_ffmpeg_wrote_wrong_is_cut_again_decoding_from_the_start(main_module, ffmpeg_exe,
                                                                       tmp_path, how):
    """ffmpeg exits 0 with a clip that has no video, one frame or no MP4 in it: the clip is read
    back, found wrong, cut a second time with -ss after -i, and that one is kept."""
    source = make_video(ffmpeg_exe, tmp_path / "tone.mp4", "320x240", *H264_444, "-c:a", "aac")
    ffmpeg, log = fake_ffmpeg(tmp_path, ffmpeg_exe, how, always=False)
    clip = cut_clip(ffmpeg, probe_video(source, 0, "tone"), ONE_AND_A_HALF, tmp_path / "clips")
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and calls[1].index("-i ") < calls[1].index("-ss "), calls
    assert_plays_from(clip, source, (320, 240), ["audio", "video"], 25)


@pytest.mark.parametrize("how", BROKEN)
def test_a_clip_that_stays_wrong_is_a_clip_error_saying_what_is_wrong(main_module, ffmpeg_exe,
                                                                      tmp_path, how):
    """A clip still wrong when cut again is not renamed into place: ClipError names the video,
    the range and what is wrong with both tries, and no clip or .part file is left."""
    source = make_video(ffmpeg_exe, tmp_path / "tone.mp4", "320x240", *H264_444, "-c:a", "aac")
    ffmpeg, log = fake_ffmpeg(tmp_path, ffmpeg_exe, how, always=True)
    with pytest.raises(ClipError) as caught:
        cut_clip(ffmpeg, probe_video(source, 0, "tone"), ONE_AND_A_HALF, tmp_path / "clips")
    message = str(caught.value)
    assert message.startswith("tone.mp4 1.00-2.50s: ffmpeg exited 0, but the clip "), message
    assert message.count(BROKEN[how]) == 2 and "cut again decoding from the start" in message, \
        message
    assert len(log.read_text().splitlines()) == 2 and os.listdir(tmp_path / "clips") == [], \
        os.listdir(tmp_path / "clips")


def test_a_range_past_the_last_frame_is_not_a_broken_clip(main_module, ffmpeg_exe, tmp_path):
    """A Matroska file whose audio outlasts its video says 3.02 s: a range to 3 s gets a clip
    with the 1 s of video there is, and that is not called wrong."""
    source = make_video(ffmpeg_exe, tmp_path / "long tone.mkv", "320x240", "-c:v", "libx264",
                        "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
                        "-vf", "trim=duration=2")  # video 2 s, audio 3 s
    info = probe_video(source, 0, "long tone")
    assert info.duration_s > 2.9, f"the header says {info.duration_s} s: not the case tested"
    span = TimeRange("Alice", 1.0, 3.0, 0.4, 1.0, 1.5)
    clip = cut_clip(ffmpeg_exe, info, span, tmp_path / "clips")
    assert abs(clip_facts(clip)["video_s"] - 1.0) <= 0.08, clip_facts(clip)


def test_a_fast_clip_may_end_some_frames_late_an_accurate_one_may_not(main_module, ffmpeg_exe,
                                                                      tmp_path):
    """A stream copy stops in decoding order: the crowd video's fast clip [0.964, 1.348) from the
    keyframe at 0 holds 3 frames more than [0, 1.348) and is fine for a fast clip, not for an
    accurate one."""
    source = TESTDATA / "videos" / "crowd_royal_opera_house.mp4"
    info = probe_video(source, 0, "crowd")
    span = TimeRange("Nobody", 0.964, 1.348, 0.5, 0.964, 1.3)
    clip = cut_clip(ffmpeg_exe, info, span, tmp_path, "fast", 0.0)
    expected_s, frame_s = source_video_s(info, 0.0, 1.348), 1 / info.fps
    extra = round((clip_facts(clip)["video_s"] - expected_s) / frame_s)
    assert extra > 2, f"{extra} extra frames: not the case tested"
    assert clip_problem(clip, expected_s, frame_s, "fast") is None
    assert "s of video" in (clip_problem(clip, expected_s, frame_s, "accurate") or ""), extra


@pytest.mark.parametrize("container", ["mkv", "avi", "mp4"])
def test_a_fast_clip_of_a_video_with_b_frames_starts_on_the_keyframe_it_reports(
        main_module, ffmpeg_exe, tmp_path, container):
    """With B-frames, ffmpeg's -ss lands 3/23 s early in formats that seek by decoding time
    (Matroska, AVI): the fast clip of [2.2, 3.2) must still start on the keyframe at 2.0 that
    clip_start reports (not on the one at 1.0) and pass its check without a re-encode."""
    from conftest import make_video
    source = make_video(ffmpeg_exe, tmp_path / f"b_frames.{container}", "320x240", "-c:v",
                        "libx264", "-preset", "veryfast", "-bf", "2", "-g", "25",
                        "-sc_threshold", "0", seconds=5, audio=False)
    info = probe_video(source, 0, "b_frames")
    keyframes = packet_times_s(info, keyframes_only=True)
    span = TimeRange("Nobody", 2.2, 3.2, 0.5, 2.2, 3.1)
    clip_start_s = keyframe_before(keyframes, span.start_s)
    assert clip_start_s == pytest.approx(2.0, abs=1e-3), keyframes
    clip = cut_clip(ffmpeg_exe, info, span, tmp_path / "clips", "fast", clip_start_s)
    shown, expected = first_frames_match(main_module, clip, source, clip_start_s)
    assert abs(shown - expected) <= 1, f"the clip starts at frame {shown}, not {expected}"


def test_an_odd_sized_video_finishes_and_a_rerun_reuses_it(main_module, ffmpeg_exe, tmp_path):
    """End to end: Obama's clip cropped to 843x613 is searched, its clip cut (842x612, with audio),
    the video ends "ok", and a rerun reuses its index and its clip instead of failing the same
    clip again."""
    from conftest import run_main, search_command
    videos, refs = tmp_path / "videos", tmp_path / "refs"
    videos.mkdir(), refs.mkdir()
    source = videos / "odd.mp4"
    done = subprocess.run([ffmpeg_exe, "-nostdin", "-v", "error", "-i",
                           str(TESTDATA / "videos" / "obama_whcd.mp4"), "-vf",
                           "crop=843:613:0:0:exact=1", *MPEG4, "-c:a", "copy", str(source)],
                          capture_output=True, text=True)
    info = probe_video(source, 0, "odd")
    assert done.returncode == 0 and (info.width, info.height) == (843, 613), (done.stderr, info)
    os.symlink(TESTDATA / "refs" / "Barack_Obama.jpg", refs / "Barack_Obama.jpg")
    made = {}
    for run in ("first", "rerun"):
        code, text = run_main(search_command(videos, refs, tmp_path / "out"), tmp_path)
        entry = json.loads((tmp_path / "out" / "results.json").read_text())["videos"][0]
        assert code == 0 and entry["status"] == "ok" and entry["ranges"], f"{run}: {text[-3000:]}"
        made[run] = {r["clip"]: (tmp_path / "out" / r["clip"]).stat().st_mtime_ns for r in entry["ranges"]}
    assert "1 video(s) reused, 0 to index" in text and entry["index_reused"], text[-3000:]
    assert made["rerun"] == made["first"], "the rerun cut its clips again"
    for r in entry["ranges"]:
        facts = clip_facts(tmp_path / "out" / r["clip"])
        assert (facts["streams"], facts["size"]) == (["audio", "video"], (842, 612)), facts
