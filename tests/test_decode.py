"""Decoding (findpeople/decode.py): pixels equal the ffmpeg command line's, times come from
timestamps."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import TESTDATA, VIDEOS
from findpeople.errors import BadInput
from findpeople.ring import (
    StageClock, _MIN_RING_SLOTS, ring_layout_for, ring_memory_budget, slot_image)
from findpeople.decode import (
    bob_deinterlace, decode_frames, decode_into_ring, describe_content, display_rotation_deg,
    first_frame, frames_look_broken, nearest_time_s, opencv_frames,
    probe_video, pyav_frames)
from findpeople.detect import detect_faces
from findpeople.clips import TimeRange, cut_clip, person_ranges
from findpeople.run import probe_all

MEDIA_INFO = json.loads((TESTDATA / "media_info.json").read_text())


def probe(main_module, path: Path):
    return probe_video(path, 0, path.stem)


def cli_frames(ffmpeg_exe: str, path: Path, width: int, height: int):
    """Yield every frame the ffmpeg command line decodes (one output frame per input frame)."""
    cmd = [ffmpeg_exe, "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0",
           "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "bgr24", "-"]
    size = width * height * 3
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as process:
        while chunk := process.stdout.read(size):
            assert len(chunk) == size, f"short frame from ffmpeg: {len(chunk)} bytes"
            yield np.frombuffer(chunk, np.uint8).reshape(height, width, 3)
    assert process.returncode == 0, f"ffmpeg failed on {path}"


@pytest.mark.parametrize("path", VIDEOS, ids=[p.name for p in VIDEOS])
def test_decoded_pixels_equal_the_ffmpeg_command_line(main_module, ffmpeg_exe, path):
    """Every decoded frame of every shared video equals what `ffmpeg -pix_fmt bgr24` decodes."""
    info = probe(main_module, path)
    ours = decode_frames(info, 1)
    count = 0
    for count, (expected, (frame_idx, _, image)) in enumerate(
            zip(cli_frames(ffmpeg_exe, path, info.width, info.height), ours), start=1):
        diff = int(np.abs(expected.astype(np.int16) - image).max())
        assert diff == 0, f"{path.name} frame {frame_idx}: max pixel difference {diff}"
    expected_count = MEDIA_INFO[path.name]["video"]["nb_frames_counted"]
    assert count == expected_count, f"{path.name}: compared {count} frames, expected {expected_count}"


@pytest.mark.parametrize("path", VIDEOS, ids=[p.name for p in VIDEOS])
def test_probe_reports_the_stream_facts(main_module, path):
    """Size, frame count, frame rate and the video stream's offset match ffprobe's facts."""
    info, facts = probe(main_module, path), MEDIA_INFO[path.name]
    assert (info.width, info.height) == (facts["video"]["width"], facts["video"]["height"])
    assert info.frame_count == facts["video"]["nb_frames_counted"]
    assert info.fps == pytest.approx(facts["video"]["fps"], abs=1e-3)
    assert info.video_start_offset_s == pytest.approx(
        facts["video"]["video_start_offset_vs_container_s"], abs=1e-3)
    assert info.has_audio == facts["has_audio"]


def test_late_starting_stream_times_start_at_zero(main_module):
    """Hamilton's video starts 0.844 s after its container: frame 0 is still time 0."""
    info = probe(main_module, TESTDATA / "videos" / "short_hamilton_clip.mp4")
    times = [t for _, t, _ in decode_frames(info, 1)]
    assert times[0] == 0.0
    assert info.video_start_offset_s == pytest.approx(0.844, abs=1e-3)
    expected_last = 274 * 100 / 2997
    assert times[-1] == pytest.approx(expected_last, abs=1e-3), f"last frame at {times[-1]}"
    assert all(b > a for a, b in zip(times, times[1:])), "times must increase"


def test_frame_interval_keeps_every_nth_frame(main_module):
    """FRAME_INTERVAL = 3 processes frames 0, 3, 6, ... and nothing else."""
    info = probe(main_module, TESTDATA / "videos" / "obama_whcd.mp4")
    indices = [i for i, _, _ in decode_frames(info, 3)]
    assert indices == list(range(0, 60, 3)), indices


@pytest.fixture(scope="module")
def vfr_video(tmp_path_factory, ffmpeg_exe):
    """A variable-frame-rate file: 10 frames 0.12 s apart, then 10 frames 0.04 s apart."""
    path = tmp_path_factory.mktemp("vfr") / "vfr.mkv"
    expr = "if(lt(N,10),N*0.12,1.2+(N-10)*0.04)/TB"
    subprocess.run([ffmpeg_exe, "-nostdin", "-v", "error", "-f", "lavfi", "-i",
                    "testsrc=size=160x120:rate=25", "-frames:v", "20", "-vf", f"setpts='{expr}'",
                    "-fps_mode", "vfr", "-c:v", "mpeg4", "-q:v", "3", str(path)], check=True)
    return path


def test_variable_frame_rate_times_follow_timestamps_not_frame_rate(main_module, vfr_video):
    """On VFR video each frame's time is its own timestamp, not frame_idx / fps."""
    info = probe(main_module, vfr_video)
    times = [t for _, t, _ in decode_frames(info, 1)]
    expected = [i * 0.12 for i in range(10)] + [1.2 + i * 0.04 for i in range(10)]
    assert len(times) == 20
    assert np.allclose(times, expected, atol=1.5e-3), f"times {np.round(times, 3).tolist()}"


# ── Bad input (issue #5): every case is generated here, then probed, decoded and searched ─────
OBAMA = TESTDATA / "videos" / "obama_whcd.mp4"
X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "18"]
UNICODE_NAME = "it's \"ünïcode\" clip #1.mp4"


def run_ffmpeg(ffmpeg_exe: str, *args) -> None:
    """Run ffmpeg quietly; fail the test with its stderr if it fails."""
    done = subprocess.run([ffmpeg_exe, "-nostdin", "-v", "error", "-y", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"ffmpeg {args}: {done.stderr[-2000:]}"


def set_display_rotation(ffmpeg_exe: str, source: Path, target: Path, degrees: int) -> Path:
    """Copy a video, adding a display matrix that turns it degrees counter-clockwise: with
    -display_rotation on ffmpeg >= 6.1, else with the 'rotate' tag that ffmpeg 5.1 turns into one."""
    import av
    for how in (["-display_rotation", str(degrees), "-i", source],
                ["-i", source, "-metadata:s:v:0", f"rotate={degrees}"]):
        done = subprocess.run([ffmpeg_exe, "-nostdin", "-v", "error", "-y", *map(str, how),
                               "-c", "copy", str(target)], capture_output=True, text=True)
        if done.returncode == 0:
            with av.open(str(target)) as container:
                if next(container.decode(video=0)).rotation % 360 == degrees % 360:
                    return target
    raise AssertionError(f"{ffmpeg_exe} cannot write a display rotation of {degrees} degrees")


def make_song_with_cover(ffmpeg_exe: str, target: Path) -> Path:
    """Write a second of an AAC tone with a JPEG as its cover picture (an attached_pic video
    stream, as music files carry album art)."""
    run_ffmpeg(ffmpeg_exe, "-f", "lavfi", "-i", "sine=frequency=440", "-i",
               TESTDATA / "refs" / "Barack_Obama.jpg", "-t", "1", "-map", "0:a", "-map", "1:v",
               "-c:a", "aac", "-c:v", "mjpeg", "-disposition:v:0", "attached_pic", target)
    return target


def cut_in_half(source: Path, target: Path) -> Path:
    """Write the first half of a file's bytes, as an interrupted download leaves it."""
    target.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return target


def make_bad_files(folder: Path, ffmpeg_exe: str) -> None:
    """Write every bad file of BAD_FILES and PARTLY_READABLE into folder."""
    import os
    import random
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("my notes about the trip\n" * 20)
    (folder / "photo.mov").write_bytes((TESTDATA / "refs" / "Barack_Obama.jpg").read_bytes())
    (folder / "noise.mkv").write_bytes(random.Random(1).randbytes(100_000))
    run_ffmpeg(ffmpeg_exe, "-f", "lavfi", "-i", "sine=frequency=440", "-t", "1", "-c:a", "aac",
               folder / "only sound.mp4")
    make_song_with_cover(ffmpeg_exe, folder / "song with cover.mp4")
    cut_in_half(OBAMA, folder / "cut short.mp4")  # its index ('moov') is at the end: gone
    faststart = folder.parent / "faststart.mp4"  # the index first: what is left still plays
    run_ffmpeg(ffmpeg_exe, "-i", OBAMA, "-c", "copy", "-movflags", "+faststart", faststart)
    cut_in_half(faststart, folder / "cut short faststart.mp4")
    (folder / "cut before the first frame.mp4").write_bytes(faststart.read_bytes()[:4000])
    damaged = bytearray(faststart.read_bytes())
    noise = random.Random(5).randbytes(50_000)
    damaged[len(damaged) // 3: len(damaged) // 3 + len(noise)] = noise
    (folder / "damaged.mp4").write_bytes(bytes(damaged))
    (folder / "clip.mp4").mkdir()
    run_ffmpeg(ffmpeg_exe, "-i", OBAMA, "-frames:v", "15", *X264, "-f", "h264", folder / "raw h264.mp4")
    run_ffmpeg(ffmpeg_exe, "-i", OBAMA, "-frames:v", "15", *X264, "-f", "h264", folder / "stream.h264")
    run_ffmpeg(ffmpeg_exe, "-f", "lavfi", "-i", "testsrc=size=64x48:rate=15", "-frames:v", "3",
               "-pix_fmt", "yuv420p", folder / "tiny.y4m")
    os.symlink(folder.parent / "nowhere.mp4", folder / "gone.mp4")


def make_good_files(folder: Path, ffmpeg_exe: str) -> None:
    """Write every video of GOOD_VIDEOS into folder: Obama's clip in many shapes and codecs, one
    of them in a folder outside reached through a link; a second link to mpeg4.avi and a loop of
    links (clip.mp4/up -> ..)."""
    import os
    run_ffmpeg(ffmpeg_exe, "-i", OBAMA, "-c", "copy", folder / UNICODE_NAME)
    sideways = folder.parent / "sideways.mp4"  # the face lies on its side in the raw frames
    run_ffmpeg(ffmpeg_exe, "-i", OBAMA, "-t", "2", "-vf", "transpose=1", *X264, "-an", sideways)
    set_display_rotation(ffmpeg_exe, sideways, folder / "rotated.mp4", 90)
    run_ffmpeg(ffmpeg_exe, "-i", OBAMA, "-t", "2", "-vf", "crop=400:614:220:0", *X264,
               folder / "portrait.mp4")
    run_ffmpeg(ffmpeg_exe, "-i", OBAMA, "-t", "2", "-vf", "scale=-2:2160,pad=3840:2160:(ow-iw)/2:0",
               *X264, "-an", folder / "4k.mp4")
    run_ffmpeg(ffmpeg_exe, "-i", OBAMA, "-frames:v", "3", "-vf",
               "scale=-2:4320,pad=7680:4320:(ow-iw)/2:0", *X264, "-an", folder / "8k.mp4")
    for name, codec in (("mpeg4.avi", "mpeg4"), ("mpeg4.mp4", "mpeg4"), ("mjpeg.avi", "mjpeg")):
        run_ffmpeg(ffmpeg_exe, "-i", OBAMA, "-t", "2", "-c:v", codec, "-q:v", "3", folder / name)
    run_ffmpeg(ffmpeg_exe, "-i", OBAMA, "-vf", "crop=844:612:0:0,tinterlace=4,setfield=tff", *X264,
               "-flags", "+ildct+ilme", "-x264-params", "interlaced=1:tff=1", "-field_order", "tt",
               "-an", folder / "interlaced.mp4")  # two source frames woven into each frame
    run_ffmpeg(ffmpeg_exe, "-i", OBAMA, "-frames:v", "30", "-vf",  # 15 frames 2/15 s apart, then 1/15
               "setpts='if(lt(N,15),N*2/15,2+(N-15)/15)/TB'", "-fps_mode", "vfr", *X264, "-an",
               folder / "vfr.mkv")
    (folder / "clip.mp4").mkdir(exist_ok=True)
    run_ffmpeg(ffmpeg_exe, "-i", OBAMA, "-frames:v", "15", "-c:v", "mpeg4", "-q:v", "3", "-an",
               folder / "clip.mp4" / "inside.mp4")
    run_ffmpeg(ffmpeg_exe, "-i", OBAMA, "-t", "2", "-c:v", "mpeg4", "-bf", "2", "-q:v", "3",
               folder / "bframes.avi")  # its container's timestamps start one frame late
    elsewhere = folder.parent / "elsewhere"  # outside the folder, reached through a link
    elsewhere.mkdir()
    run_ffmpeg(ffmpeg_exe, "-i", OBAMA, "-frames:v", "15", "-c:v", "mpeg4", "-q:v", "3", "-an",
               elsewhere / "elsewhere.mp4")
    os.symlink(elsewhere, folder / "linked")
    os.symlink("mpeg4.avi", folder / "again.avi")  # the same file twice: searched once
    os.symlink("..", folder / "clip.mp4" / "up")  # a loop: reported once


BAD_FILES = {  # file -> what its message must say (it always starts with the file's path)
    "empty.mp4": r"is empty \(0 bytes\), probably an unfinished copy or download; copy it again",
    "notes.mp4": r"is a text file, not a video; remove it from the video folder",
    "photo.mov": r"is a still image \(jpeg_pipe\), not a video; remove it .*reference folder",
    "noise.mkv": r"cannot be opened as a video \(.*\); check that it plays in a video player",
    "only sound.mp4": r"has no video stream \(audio only: aac\), so there is nothing to search",
    "song with cover.mp4": r"has no video stream \(audio only: aac, with a cover picture\), so there "
                           r"is nothing to search; remove it from the folder",
    "cut short.mp4": r"is an MP4/MOV file that ffmpeg cannot read .* truncated .*'moov'.* copy it again",
    "cut before the first frame.mp4": r"no frame can be decoded.*; the file is truncated or damaged",
    "clip.mp4": r"is a folder named like a video, not a video; the videos inside it are searched",
    "raw h264.mp4": r"is raw H\.264 video without a container, not a video file: it has no "
                    r"timestamps, so the times of what is found could not be known; put it in a "
                    r"container at its frame rate, 15 fps as the stream itself says: ffmpeg "
                    r"-framerate 15 -i IN -c copy OUT\.mp4, and search that",
    "stream.h264": r"is raw H\.264 video without a container, not a video file: it has no "
                   r"timestamps, .*ffmpeg -framerate 15 -i IN -c copy OUT\.mp4, and search that",
    "tiny.y4m": r"is not searched: \.y4m is not one of the video formats searched \(\.3gp, .*\); "
                r"convert it \(ffmpeg -i IN -c:v libx264 OUT\.mp4\) and search that",
    "gone.mp4": r"is a link to .*nowhere\.mp4, which does not exist \(moved, deleted, or on a disk "
                r"that is not mounted\); fix the link or remove it",
}
PARTLY_READABLE = {  # file -> (frames decoded, what its message must say)
    "cut short faststart.mp4": (29, r"decoding stopped at 1\.87 s of 4\.00 s \(29 of 60 frames\): "
                                    r"the file is truncated, and the rest was not searched"),
    "damaged.mp4": (57, r"3 damaged packet\(s\) could not be decoded \(at [0-9., ]+ s\): the "
                        r"frames around them were not searched"),
}
GOOD_VIDEOS = {  # file -> (frames, displayed width x height, share of frames Obama must be named on)
    UNICODE_NAME: (60, (844, 614), 0.9),
    "rotated.mp4": (30, (844, 614), 0.9),
    "portrait.mp4": (30, (400, 614), 0.9),
    "4k.mp4": (30, (3840, 2160), 0.9),
    "8k.mp4": (3, (7680, 4320), 0.0),  # processed without error is enough: 3 frames
    "mpeg4.avi": (30, (844, 614), 0.9),
    "mpeg4.mp4": (30, (844, 614), 0.9),
    "mjpeg.avi": (30, (844, 614), 0.9),
    "interlaced.mp4": (30, (844, 612), 0.9),
    "vfr.mkv": (30, (844, 614), 0.9),
    "inside.mp4": (15, (844, 614), 0.9),  # in the folder clip.mp4/
    "bframes.avi": (30, (844, 614), 0.9),  # MPEG-4 with B-frames in AVI
    "elsewhere.mp4": (15, (844, 614), 0.9),  # in a folder outside, through the link linked/
}


@pytest.fixture(scope="module")
def matrix_dir(tmp_path_factory, ffmpeg_exe) -> Path:
    """A folder holding every bad file and every good variant of Obama's clip."""
    folder = tmp_path_factory.mktemp("matrix") / "videos"
    folder.mkdir()
    make_bad_files(folder, ffmpeg_exe)
    make_good_files(folder, ffmpeg_exe)
    return folder


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_bad_file_is_refused_naming_it_what_is_wrong_and_what_to_do(main_module, matrix_dir, name):
    """probe_video raises BadInput that starts with the file's path and says what to do."""
    path = matrix_dir / name
    with pytest.raises(BadInput) as raised:
        probe_video(path, 0, path.stem)
    message = str(raised.value)
    assert message.startswith(f"{path}: "), message
    assert re.search(BAD_FILES[name], message), f"{name}: {message}"


@pytest.mark.parametrize("name", PARTLY_READABLE)
def test_a_truncated_or_damaged_file_yields_what_it_can_then_says_so(main_module, matrix_dir, name):
    """A file that opens but ends early or holds damaged packets gives every frame it can, then
    BadInput saying what was lost."""
    path = matrix_dir / name
    info = probe_video(path, 0, path.stem)
    frames = []
    with pytest.raises(BadInput) as raised:
        for frame in decode_frames(info, 1):
            frames.append(frame)
    count, pattern = PARTLY_READABLE[name]
    assert len(frames) == count, f"{name}: {len(frames)} frames, expected {count}"
    assert str(raised.value).startswith(f"{path}: ") and re.search(pattern, str(raised.value)), \
        str(raised.value)


def probe_as_other_user(folder: Path) -> tuple:
    """Run probe_all over a folder in a new Python process, as user nobody (setpriv) when we are
    root (root reads any file); return (usable file names, problems)."""
    import os
    import sys
    from conftest import REPO
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from findpeople.folders import list_videos; from findpeople.run import probe_all; "
            "folder = Path(sys.argv[2]); videos, problems = probe_all(list_videos(folder), "
            "folder); print(json.dumps([[Path(v.path).name for v in videos], problems]))")
    cmd = [sys.executable, "-c", code, str(REPO), str(folder)]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


def test_an_unreadable_video_is_reported_as_permission_denied(ffmpeg_exe):
    """A video this user may not read (chmod 000) is reported by name, with 'permission denied'
    and how to fix it, and so is a subfolder this user may not open (its videos are left out);
    a readable one beside them is probed as usual."""
    import shutil
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="sfv_test_perm_"))  # not tmp_path: that is mode 0700
    private = folder / "private"
    try:
        folder.chmod(0o755)
        run_ffmpeg(ffmpeg_exe, "-i", OBAMA, "-frames:v", "5", "-c:v", "mpeg4", folder / "readable.mp4")
        locked = folder / "locked.mp4"
        shutil.copy(folder / "readable.mp4", locked)
        locked.chmod(0)
        (folder / "readable.mp4").chmod(0o644)
        private.mkdir()
        shutil.copy(folder / "readable.mp4", private / "hidden.mp4")
        private.chmod(0)
        usable, problems = probe_as_other_user(folder)
    finally:
        if private.exists():
            private.chmod(0o755)
        shutil.rmtree(folder)
    assert usable == ["readable.mp4"], (usable, problems)
    assert len(problems) == 2 and problems[0].startswith(f"{locked}: permission denied"), problems
    assert "make it readable (chmod a+r" in problems[0], problems
    assert problems[1] == (f"{private}: this folder cannot be opened (Permission denied), so the "
                           f"videos in it are left out; make it readable (chmod a+rx, or ask its "
                           f"owner), or move them out"), problems


@pytest.mark.parametrize("head, expected", [
    (b"", None),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"%PDF-1.7\n", "a PDF document"),
    (b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00", "an MP4/MOV file"),
    (b"my notes about the trip\n", "a text file"),
    ("ünïcode notes, cut inside a character: ü".encode()[:-1], "a text file"),
    (b"\x1aE\xdf\xa3\x9fB\x86\x81\x01", None),  # Matroska: ffmpeg's to judge
    (bytes(range(64)), None),
])
def test_first_bytes_tell_what_a_file_is(main_module, head, expected):
    """describe_content names common non-videos from their first bytes, and nothing else."""
    assert describe_content(head) == expected, head


@pytest.mark.parametrize("rotation, expected", [
    (0, 0), (90, 90), (-90, 270), (180, 180), (-180, 180), (89.6, 90), (-0.0, 0), (270, 270)])
def test_display_rotation_is_a_quarter_turn_counter_clockwise(main_module, rotation, expected):
    """PyAV's frame.rotation (degrees counter-clockwise, -180..180) becomes 0, 90, 180 or 270."""
    assert display_rotation_deg(rotation) == expected


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotated_video_frames_are_what_a_player_shows(main_module, ffmpeg_exe, tmp_path, degrees):
    """With a display rotation in the file, width and height are the displayed ones and every
    frame equals what the ffmpeg command line shows (it rotates, like players do)."""
    short = tmp_path / "short.mp4"
    run_ffmpeg(ffmpeg_exe, "-i", OBAMA, "-frames:v", "5", *X264, "-an", short)
    path = set_display_rotation(ffmpeg_exe, short, tmp_path / f"rotated_{degrees}.mp4", degrees)
    info = probe(main_module, path)
    expected_size = (614, 844) if degrees in (90, 270) else (844, 614)
    assert (info.width, info.height, info.rotation_deg) == (*expected_size, degrees), info
    shown = list(cli_frames(ffmpeg_exe, path, info.width, info.height))
    ours = [image for _, _, image in decode_frames(info, 1)]
    assert len(ours) == len(shown) == 5
    for i, (a, b) in enumerate(zip(shown, ours)):
        diff = float(np.abs(a.astype(np.int16) - b).mean())
        assert diff < 2.0, f"frame {i}: mean difference {diff:.2f} from the player's picture"


def combing(image: np.ndarray) -> float:
    """Mean difference between neighbouring lines minus that between lines two apart: > 0 where
    two fields from different instants are woven together."""
    grey = image.astype(np.float32).mean(axis=2)
    return float(np.abs(grey[1:] - grey[:-1]).mean() - np.abs(grey[2:] - grey[:-2]).mean() / 2)


def test_bob_deinterlace_keeps_one_field_at_full_height(main_module):
    """Two pictures woven line by line become the first picture (its even lines, stretched)."""
    first = np.tile(np.linspace(0, 200, 64, dtype=np.uint8)[:, None, None], (1, 48, 3))
    woven = first.copy()
    woven[1::2] = 255 - first[1::2]
    result = bob_deinterlace(woven)
    assert result.shape == woven.shape
    diff = float(np.abs(result.astype(np.int16) - first).mean())
    assert diff < 3.0, f"mean difference {diff:.2f} from the first picture"


def test_interlaced_frames_are_deinterlaced_before_detection(main_module, matrix_dir):
    """Frames flagged interlaced come out without combing (PyAV's raw frames show it)."""
    import av
    info = probe(main_module, matrix_dir / "interlaced.mp4")
    with av.open(info.path) as container:
        raw = [f for f in container.decode(video=0)]
    assert all(f.interlaced_frame for f in raw), "the test file should be interlaced"
    raw_combing = np.mean([combing(f.to_ndarray(format="bgr24")) for f in raw])
    ours = np.mean([combing(image) for _, _, image in decode_frames(info, 1)])
    assert ours < raw_combing / 2, f"combing {ours:.2f} after, {raw_combing:.2f} before"


# ── A decoder that 'succeeds' with blank or frozen pictures: OpenCV takes over ────────────────
@pytest.mark.parametrize("pictures, broken", [
    ([], True),
    ([np.zeros((60, 80, 3), np.uint8)] * 3, True),
    ([np.full((60, 80, 3), (0, 135, 0), np.uint8)] * 3, True),  # green: YUV all zero
    ([np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8)] * 3, True),  # frozen
    ([np.random.default_rng(i).integers(0, 255, (60, 80, 3), dtype=np.uint8) for i in range(3)], False),
    ([np.zeros((60, 80, 3), np.uint8), np.full((60, 80, 3), 90, np.uint8)], True),  # two blanks
    ([np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8)], False),  # one picture
], ids=["none", "black", "green", "frozen", "moving", "black-then-grey", "one-picture"])
def test_blank_or_frozen_pictures_look_broken(main_module, pictures, broken):
    """frames_look_broken: no picture, only uniform ones, or one picture repeated."""
    assert frames_look_broken(pictures) is broken


@pytest.mark.parametrize("approx_s, expected_s", [
    (0.0, 0.0), (0.0665, 0.0667), (0.1, 0.1), (0.11, 0.11), (0.12, 0.1334), (5.0, 5.0)])
def test_opencv_positions_snap_to_packet_timestamps(main_module, approx_s, expected_s):
    """nearest_time_s returns the nearest exact timestamp within the tolerance, else the guess."""
    times_s = [0.0, 0.0667, 0.1334]
    assert nearest_time_s(times_s, approx_s, 0.02) == expected_s


def opencv_pictures(path: Path) -> list:
    """Every picture OpenCV decodes from a video, in order."""
    import cv2
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    pictures = []
    while (read := capture.read())[0]:
        pictures.append(read[1])
    capture.release()
    return pictures


def decode_with_fake_ring(main_module, info, slot_count: int | None = None) -> tuple:
    """Run decode_into_ring in this process on a NumPy ring shaped as ring_view shapes the shared
    one, with plain queues; return (result, [(frame_idx, time_s, picture)])."""
    import queue
    import threading
    slot_count = slot_count or info.frame_count + 1
    layout = ring_layout_for([info], slot_count, "test")
    ring = np.zeros((layout.slot_count, layout.slot_bytes), np.uint8)
    free_q, filled_q = queue.Queue(), queue.Queue()
    for slot in range(len(ring)):
        free_q.put(slot)
    result = decode_into_ring(info, ring, free_q, filled_q, threading.Event(), 1,
                                          StageClock())
    frames = []
    while not filled_q.empty():
        _, _, frame_idx, time_s, height, width, slot = filled_q.get()
        frames.append((frame_idx, time_s, slot_image(ring, slot, height, width).copy()))
    return result, frames


def blank_decoder(real):
    """A pyav_frames that keeps the real times but returns black pictures."""
    def frames(info, frame_interval, damaged_pts):
        for frame_idx, time_s, image in real(info, frame_interval, damaged_pts):
            yield frame_idx, time_s, None if image is None else np.zeros_like(image)
    return frames


def frozen_decoder(real):
    """A pyav_frames that keeps the real times but repeats the first picture."""
    def frames(info, frame_interval, damaged_pts):
        first = None
        for frame_idx, time_s, image in real(info, frame_interval, damaged_pts):
            first = image if first is None else first
            yield frame_idx, time_s, None if image is None else first.copy()
    return frames


@pytest.mark.parametrize("broken_decoder", [blank_decoder, frozen_decoder], ids=["blank", "frozen"])
def test_a_decoder_giving_blank_or_frozen_pictures_is_replaced_by_opencv(
        main_module, monkeypatch, capsys, broken_decoder):
    """If PyAV returns success with blank (or always the same) pictures, the ring gets OpenCV's
    pictures instead, each at its exact timestamp, and a message names the file."""
    info = probe(main_module, OBAMA)
    true_times = [t for _, t, _ in decode_frames(info, 1)]
    monkeypatch.setattr("findpeople.decode.pyav_frames", broken_decoder(pyav_frames))
    (sent, error), frames = decode_with_fake_ring(main_module, info)
    assert (sent, error) == (60, None), error
    assert [t for _, t, _ in frames] == true_times, "times must be the frames' own timestamps"
    assert [i for i, _, _ in frames] == list(range(60))
    for (frame_idx, _, picture), expected in zip(frames, opencv_pictures(OBAMA), strict=True):
        assert np.array_equal(picture, expected), f"frame {frame_idx} is not OpenCV's picture"
    printed = capsys.readouterr().out
    assert f"{OBAMA}: PyAV decoded only blank or frozen pictures" in printed, printed
    assert "decoded with OpenCV" in printed, printed


@pytest.mark.parametrize("opening", ["black", "still"])
def test_a_video_that_opens_on_black_or_a_still_stays_with_pyav(main_module, ffmpeg_exe, tmp_path,
                                                                monkeypatch, capsys, opening):
    """A real video starting with a second of black, or of one still picture (lossless, so its
    frames are identical), looks broken in both decoders: OpenCV is asked, shows the same, and
    PyAV keeps decoding it, with no message (no false alarm)."""
    path = tmp_path / f"{opening}.mp4"
    first = ["-f", "lavfi", "-i", "color=black:size=844x614:rate=15:duration=1"] if opening == "black" \
        else ["-loop", "1", "-framerate", "15", "-t", "1", "-i", TESTDATA / "refs" / "Barack_Obama.jpg"]
    run_ffmpeg(ffmpeg_exe, *first, "-i", OBAMA, "-filter_complex",
               "[0:v]scale=844:614,setsar=1,format=yuv420p[a];[1:v]setsar=1[b];[a][b]concat=n=2:v=1[v]",
               "-map", "[v]", "-c:v", "libx264", "-preset", "ultrafast", "-qp", "0", path)
    asked = []
    real_opencv = opencv_frames
    monkeypatch.setattr("findpeople.decode.opencv_frames",                         lambda *args: asked.append(args[0].path) or real_opencv(*args))
    info = probe(main_module, path)
    ours = list(decode_frames(info, 1))
    printed = capsys.readouterr().out
    assert asked == [str(path)], "OpenCV should have been asked for a second opinion"
    assert "decoded with OpenCV" not in printed, printed
    assert len(ours) == 75, len(ours)
    import av
    with av.open(str(path)) as container:
        plain = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    assert all(np.array_equal(a, b) for (_, _, a), b in zip(ours, plain)), "not PyAV's pictures"


# ── The whole search over the bad-input folder: one run, then one check per case ─────────────
@pytest.fixture(scope="module")
def growing_ts(tmp_path_factory, ffmpeg_exe) -> tuple:
    """(the bytes of Obama's clip as MPEG-TS, 4 s without an index or a frame count, and where
    its first half ends, on a TS packet boundary)."""
    full = tmp_path_factory.mktemp("grow") / "full.ts"
    run_ffmpeg(ffmpeg_exe, "-i", OBAMA, *X264, "-f", "mpegts", full)
    data = full.read_bytes()
    return data, len(data) // 2 // 188 * 188


_GROW_SHIM = '''"""Test shim (issue #11): a copy still going on. In a decoder process, once the video
SFV_TEST_GROW names has given some packets, the rest of the file is appended to it.

SFV_TEST_GROW = "<file name>|<packets>|<file holding the rest>".
"""
import multiprocessing
import os

_NAME, _PACKETS, _REST = os.environ["SFV_TEST_GROW"].split("|")


class _GrowingContainer:
    def __init__(self, container, path):
        self._container, self._path = container, path

    def __getattr__(self, name):
        return getattr(self._container, name)

    def __enter__(self):
        self._container.__enter__()
        return self

    def __exit__(self, *exc):
        return self._container.__exit__(*exc)

    def demux(self, *args, **kwargs):
        for count, packet in enumerate(self._container.demux(*args, **kwargs)):
            if count == int(_PACKETS):
                with open(self._path, "ab") as file, open(_REST, "rb") as rest:
                    file.write(rest.read())
            yield packet


def _open(path, *args, **kwargs):
    container = _real_open(path, *args, **kwargs)
    growing = os.path.basename(str(path)) == _NAME
    growing = growing and multiprocessing.current_process().name.startswith("decoder-")
    return _GrowingContainer(container, path) if growing else container


import av  # noqa: E402

_real_open, av.open = av.open, _open
'''


@pytest.fixture(scope="module")
def matrix_run(matrix_dir, ffmpeg_exe, growing_ts):
    """One search (in a subprocess) over every bad file and good variant, with every reference,
    and recording.ts, half copied: a shim appends the rest once its decoder has read 10 packets."""
    import os
    import time
    import uuid
    from conftest import link_all_refs, search_command
    base = matrix_dir.parent
    refs = link_all_refs(base / "refs")
    data, half = growing_ts
    (matrix_dir / "recording.ts").write_bytes(data[:half])
    (base / "rest").write_bytes(data[half:])
    (base / "grow_shim").mkdir()
    (base / "grow_shim" / "sitecustomize.py").write_text(_GROW_SHIM)
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    env = {**os.environ, marker: "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(base / "grow_shim"),
           "SFV_TEST_GROW": f"recording.ts|10|{base / 'rest'}"}
    cmd = search_command(matrix_dir, refs, base / "out")
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=base) as process:
        stdout, stderr = process.communicate(timeout=900)
    time.sleep(0.5)
    return {"returncode": process.returncode, "stdout": stdout, "stderr": stderr, "out": base / "out",
            "marker": marker, "ring": f"sfv{process.pid}r",
            "results": json.loads((base / "out" / "results.json").read_text())}


def matrix_entry(matrix_run, name: str) -> dict:
    """The results.json entry of the video with this file name (there must be exactly one)."""
    entries = [v for v in matrix_run["results"]["videos"] if Path(v["file"]).name == name]
    assert len(entries) == 1, f"{name}: {len(entries)} entries in results.json"
    return entries[0]


def test_a_run_over_bad_files_goes_on_exits_1_and_leaves_nothing_behind(matrix_run):
    """Bad files do not stop the run: it ends normally with exit code 1 (something was skipped),
    leaving no child process and no shared memory."""
    from conftest import processes_with_marker, shm_names
    output = matrix_run["stdout"] + matrix_run["stderr"]
    assert matrix_run["returncode"] == 1, output[-3000:]
    assert "pipeline broken" not in output and "Traceback" not in output, output[-3000:]
    assert processes_with_marker(matrix_run["marker"]) == []
    assert matrix_run["ring"] not in shm_names(), f"/dev/shm/{matrix_run['ring']} was left behind"


@pytest.mark.parametrize("name", [*BAD_FILES, *PARTLY_READABLE])
def test_each_bad_file_is_listed_in_failures_by_name_with_what_to_do(matrix_run, matrix_dir, name):
    """Every bad file has exactly one failure in results.json (also printed under problems) that
    starts with its path and says what is wrong and what to do."""
    pattern = BAD_FILES.get(name) or PARTLY_READABLE[name][1]
    path = matrix_dir / name
    mine = [f for f in matrix_run["results"]["failures"] if f.startswith(f"{path}: ")]
    assert len(mine) == 1 and re.search(pattern, mine[0]), (name, mine)
    assert f"    - {mine[0]}" in matrix_run["stdout"], "the summary must print it"


@pytest.mark.parametrize("name", PARTLY_READABLE)
def test_a_partly_readable_video_is_searched_as_far_as_it_goes(matrix_run, name):
    """A truncated or damaged video is searched up to where it breaks: Obama is found there."""
    entry = matrix_entry(matrix_run, name)
    frames = {d["frame"] for d in entry["detections"] if d["name"] == "Barack_Obama"}
    assert entry["processed_frame_count"] == PARTLY_READABLE[name][0], entry["processed_frame_count"]
    assert len(frames) >= 0.75 * entry["processed_frame_count"], f"found on {len(frames)} frames"
    assert entry["status"] == "incomplete" and entry["errors"], entry["status"]


def test_a_video_still_being_copied_is_incomplete_and_writes_no_index(matrix_run, matrix_dir,
                                                                   growing_ts):
    """recording.ts, whose copy goes on while it is searched (a shim appends the rest once its
    decoder has read 10 packets), is searched as far as it then went, is "incomplete" with the
    reason (one failure: the run exits with 1) and writes no index, so the next run indexes it
    again (the other videos' indexes are written)."""
    data, half = growing_ts
    path = matrix_dir / "recording.ts"
    message = (f"{path}: changed while it was searched ({half} bytes when it was opened, "
               f"{len(data)} bytes now): it is still being copied or recorded, or was replaced, so "
               f"what was searched may not be all of it. Run again once the file is complete: it is "
               f"then searched again")
    entry = matrix_entry(matrix_run, "recording.ts")
    assert (entry["status"], entry["errors"]) == ("incomplete", [message]), entry["errors"]
    assert entry["processed_frame_count"] == 60, entry["processed_frame_count"]
    mine = [f for f in matrix_run["results"]["failures"] if f.startswith(f"{path}: ")]
    assert mine == [message] and f"    - {message}" in matrix_run["stdout"], mine
    indexes = matrix_run["out"].with_name("out_index")
    assert not (indexes / f"{entry['output_folder']}.parquet").exists(), \
        "an incomplete video's index was written for reuse"
    ok = [v["output_folder"] for v in matrix_run["results"]["videos"] if v["status"] == "ok"]
    assert ok and all((indexes / f"{name}.parquet").is_file() for name in ok), sorted(indexes.iterdir())


def fits_the_ring(main_module, width: int, height: int) -> bool:
    """Whether this machine's memory holds the 2 ring slots such frames need."""
    budget_bytes, _ = ring_memory_budget()
    return budget_bytes is None or budget_bytes >= _MIN_RING_SLOTS * width * height * 3


@pytest.mark.parametrize("name", GOOD_VIDEOS)
def test_each_good_variant_is_searched_and_obama_found(main_module, matrix_run, matrix_dir, name):
    """Odd names, rotation, portrait, 4K/8K, old codecs, interlacing, VFR and a video inside a
    folder named like a video: searched without error at the displayed size, Obama named on
    most frames, with a clip and snapshots for each range."""
    frame_count, (width, height), share = GOOD_VIDEOS[name]
    if not fits_the_ring(main_module, width, height):  # this machine: refused, by name
        assert any(name in f and "of shared memory" in f for f in matrix_run["results"]["failures"])
        return
    entry = matrix_entry(matrix_run, name)
    assert entry["errors"] == [] and entry["status"] == "ok", entry["errors"]
    assert (entry["width"], entry["height"]) == (width, height)
    assert entry["processed_frame_count"] == frame_count, entry["processed_frame_count"]
    frames = {d["frame"] for d in entry["detections"] if d["name"] == "Barack_Obama"}
    assert len(frames) >= share * entry["processed_frame_count"], \
        f"{name}: Obama on {len(frames)} of {entry['processed_frame_count']} frames"
    for r in entry["ranges"]:
        assert (matrix_run["out"] / r["clip"]).is_file(), r
    snapshots = list((matrix_run["out"] / entry["output_folder"]).glob("frame_*.jpg"))
    assert snapshots or not entry["ranges"], f"{name}: no snapshot"


def test_a_rotated_video_gives_upright_snapshots_and_clips(matrix_run, matrix_dir, ffmpeg_exe):
    """Snapshots of the rotated video are upright (844 wide, 614 high), and its accurate clip is
    re-encoded upright with the same size and no rotation left; its first frame is the first
    frame as displayed."""
    import av
    import cv2
    entry = matrix_entry(matrix_run, "rotated.mp4")
    shots = list((matrix_run["out"] / entry["output_folder"]).glob("frame_*.jpg"))
    assert shots and all(cv2.imread(str(p)).shape == (614, 844, 3) for p in shots), shots
    clip = matrix_run["out"] / entry["ranges"][0]["clip"]
    with av.open(str(clip)) as container:
        first = next(container.decode(video=0))
        assert (first.width, first.height, first.rotation) == (844, 614, 0)
        picture = first.to_ndarray(format="bgr24").astype(np.int16)
    shown = next(cli_frames(ffmpeg_exe, matrix_dir / "rotated.mp4", 844, 614))
    diff = float(np.abs(picture - shown).mean())
    assert diff < 4.0, f"the clip's first frame differs from the displayed one by {diff:.2f}"


def test_a_fast_clip_of_a_rotated_video_keeps_its_rotation(main_module, matrix_dir, ffmpeg_exe, tmp_path):
    """A stream-copied (fast) clip keeps the display matrix, so players show it upright too."""
    import av
    info = probe(main_module, matrix_dir / "rotated.mp4")
    time_range = TimeRange("Barack_Obama", 0.0, 1.0, 0.5, 0.0, 1.0)
    clip = cut_clip(ffmpeg_exe, info, time_range, tmp_path, "fast", 0.0)
    with av.open(str(clip)) as container:
        assert next(container.decode(video=0)).rotation == 90


def test_report_links_open_the_clips_and_snapshots_of_an_odd_name(matrix_run):
    """In index.html, every link and picture of the video named with quotes, spaces, '#' and
    accents opens an existing file."""
    import html
    from urllib.parse import unquote
    page = (matrix_run["out"] / "index.html").read_text(encoding="utf-8")
    targets = [unquote(html.unescape(t)) for t in re.findall(r'(?:href|src)="([^"]+)"', page)
               if not t.startswith(("data:", "#"))]
    odd = [t for t in targets if t.startswith(Path(UNICODE_NAME).stem + "/")]
    assert any(t.endswith(".mp4") for t in odd) and any(t.endswith(".jpg") for t in odd), odd
    missing = [t for t in targets if not (matrix_run["out"] / t).is_file()]
    assert not missing, f"links to missing files: {missing[:5]}"


def test_vfr_video_detections_are_at_its_frame_timestamps(main_module, matrix_run, matrix_dir):
    """In the variable-frame-rate file, every detection's time is one of its frames' own times."""
    info = probe(main_module, matrix_dir / "vfr.mkv")
    times = [t for _, t, _ in decode_frames(info, 1)]
    gaps = set(np.round(np.diff(times), 2).tolist())  # Matroska keeps milliseconds
    assert gaps == {0.13, 0.07}, f"not the variable frame rate made: gaps {sorted(gaps)}"
    entry = matrix_entry(matrix_run, "vfr.mkv")
    assert entry["processed_frame_count"] == len(times)
    off = [d["time"] for d in entry["detections"] if min(abs(d["time"] - t) for t in times) > 1e-3]
    assert not off, f"detections between frames: {off[:5]}"


def test_a_file_reached_through_several_paths_is_searched_once_and_a_loop_noted_once(
        matrix_run, matrix_dir):
    """mpeg4.avi and the link again.avi to it are searched once, under its real path, with one
    note; the loop of links clip.mp4/up -> .. is noted once; no two videos share an output
    folder (the video in a folder reached through a link: [elsewhere.mp4] above)."""
    videos = matrix_run["results"]["videos"]
    folders = [v["output_folder"].casefold() for v in videos]
    assert len(set(folders)) == len(folders), sorted(folders)
    assert not [v for v in videos if Path(v["file"]).name == "again.avi"], "again.avi searched"
    assert matrix_entry(matrix_run, "mpeg4.avi")["file"] == str((matrix_dir / "mpeg4.avi").resolve())
    out = matrix_run["stdout"]
    again = f"[*] {matrix_dir / 'again.avi'}: the same file as {matrix_dir / 'mpeg4.avi'}: searched once"
    loop = f"[*] {matrix_dir / 'clip.mp4' / 'up'}: not followed: this link leads back to"
    assert out.count(again) == 1 and out.count(loop) == 1, out[:3000]


def test_every_range_lies_within_its_video(matrix_run):
    """Every range of every video searched without error ("ok") starts at 0 or later and ends at
    the video's duration or earlier (the AVI with B-frames used to end one frame past it, the VFR
    file one average frame past it). A video that held more than its probed duration is not
    "ok": see recording.ts."""
    videos = [v for v in matrix_run["results"]["videos"] if v["status"] == "ok"]
    outside = [(Path(v["file"]).name, r["start"], r["end"], v["duration_s"])
               for v in videos for r in v["ranges"]
               if r["start"] < 0 or r["end"] > v["duration_s"] + 6e-4]  # end: 3 decimals
    ranges = sum(len(v["ranges"]) for v in videos)
    assert ranges >= len(GOOD_VIDEOS) - 1 and not outside, (ranges, outside)


def test_times_count_from_the_first_frames_own_timestamp(main_module, matrix_dir):
    """In an AVI with B-frames, whose container timestamps start one frame late, the first frame
    is time 0 and the frames are 1/15 s apart, so a range ending at its last frame ends at the
    stream's duration (2 s), not a frame past it."""
    info = probe(main_module, matrix_dir / "bframes.avi")
    times = [t for _, t, _ in decode_frames(info, 1)]
    assert np.allclose(times, [i / 15 for i in range(30)], atol=1e-6), np.round(times[:3], 4)
    assert info.duration_s == pytest.approx(2.0, abs=1e-6), info.duration_s
    settings = main_module.load_settings(["--clip-duration-after", "2"])
    ranges = person_ranges("Barack_Obama", [(times[-1], 0.5)], info, settings)
    assert [r.end_s for r in ranges] == pytest.approx([2.0], abs=1e-6), ranges


@pytest.mark.parametrize("how", ["appended to", "written in place"])
def test_a_video_that_changes_while_it_is_searched_is_reported_with_the_reason(
        main_module, growing_ts, tmp_path, how):
    """A TS still being copied (probed at half its length, the rest appended before it is
    decoded), or written again in place (same size, a later modification time), is decoded as
    far as it goes, then BadInput says it changed while it was searched, and how."""
    import os
    data, half = growing_ts
    path = tmp_path / "recording.ts"
    path.write_bytes(data[:half] if how == "appended to" else data)
    info = probe(main_module, path)
    if how == "appended to":
        with open(path, "ab") as file:
            file.write(data[half:])
    else:
        path.write_bytes(data)
        os.utime(path, ns=(info.file_mtime_ns + 10**9, info.file_mtime_ns + 10**9))
    frames = []
    with pytest.raises(BadInput) as raised:
        for frame in decode_frames(info, 1):
            frames.append(frame)
    now = f"{len(data)} bytes now" if how == "appended to" else "the same size, but written to since"
    assert str(raised.value) == (
        f"{path}: changed while it was searched ({info.file_bytes} bytes when it was opened, "
        f"{now}): it is still being copied or recorded, or was replaced, so what was searched may "
        f"not be all of it. Run again once the file is complete: it is then searched again"), \
        str(raised.value)
    assert len(frames) == 60, len(frames)


def test_a_video_that_holds_far_more_than_its_probe_said_is_reported(main_module, growing_ts,
                                                                      tmp_path):
    """A TS probed at a quarter of its length (about 1 s) decodes on to 3.93 s, past its probed
    duration by more than 2 s (and 10 %): BadInput says so, also where the file's size and time
    are not compared (the rule's second witness of a file that grew)."""
    import dataclasses
    data, _ = growing_ts
    path = tmp_path / "recording.ts"
    path.write_bytes(data[:len(data) // 4 // 188 * 188])
    info = dataclasses.replace(probe(main_module, path), file_bytes=None)
    path.write_bytes(data)
    with pytest.raises(BadInput) as raised:
        list(decode_frames(info, 1))
    assert re.fullmatch(
        rf"{re.escape(str(path))}: holds more than it did when it was opened: decoding went on to "
        rf"3\.93 s, past the 1\.[0-9]{{2}} s its header said then \(60 frames, 1[0-9] expected\), "
        rf"so the file grew while it was searched \(a copy or recording still going on\), or its "
        rf"header is wrong\. Run again once the file is complete; .*", str(raised.value)), \
        str(raised.value)


# ── Odd files and decoder faults stop only their own video (issue #5) ──────────────────────
@pytest.mark.parametrize("suffix", [".m4a", ".mp4"])
def test_a_song_with_a_cover_picture_is_refused_as_audio_only(main_module, ffmpeg_exe, tmp_path, suffix):
    """An audio file whose album art is stored as a video stream (attached_pic) is not searched as
    a one-picture video: it is refused as audio only, with a cover picture."""
    path = make_song_with_cover(ffmpeg_exe, tmp_path / f"song{suffix}")
    with pytest.raises(BadInput) as raised:
        probe(main_module, path)
    assert str(raised.value).startswith(f"{path}: has no video stream (audio only: aac, with a "
                                        f"cover picture)"), str(raised.value)


def test_a_file_that_cannot_be_read_is_skipped_by_name_and_the_rest_probed(main_module, tmp_path,
                                                                          monkeypatch):
    """A read error other than 'permission denied' (EIO from a failing disk or share) skips that
    file with a message naming it and what to do; the next video is still probed."""
    import builtins
    import errno
    import os
    bad = tmp_path / "bad sector.mp4"
    os.symlink(OBAMA, bad)

    def failing_open(path, *args, **kwargs):
        if Path(path) == bad:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return builtins.open(path, *args, **kwargs)
    monkeypatch.setattr("findpeople.decode.open", failing_open, raising=False)
    videos, problems = probe_all([bad, OBAMA], tmp_path)
    assert [Path(v.path).name for v in videos] == ["obama_whcd.mp4"], problems
    assert problems == [f"{bad}: cannot be read (Input/output error); check the disk or the network "
                        f"share it is on (dmesg lists read errors), copy it again, or remove it "
                        f"from the folder"], problems


def test_an_unexpected_error_while_probing_skips_only_that_file(main_module, tmp_path, monkeypatch):
    """Any other failure while probing (here a ZeroDivisionError) skips the file by name."""
    odd = tmp_path / "odd.mp4"
    odd.symlink_to(OBAMA)
    real = first_frame

    def first(path, container, stream):
        if path == odd:
            raise ZeroDivisionError("float division by zero")
        return real(path, container, stream)
    monkeypatch.setattr("findpeople.decode.first_frame", first)
    videos, problems = probe_all([odd, OBAMA], tmp_path)
    assert [Path(v.path).name for v in videos] == ["obama_whcd.mp4"], problems
    assert len(problems) == 1 and problems[0].startswith(
        f"{odd}: cannot be probed (ZeroDivisionError: float division by zero)"), problems


def test_an_unexpected_decoder_error_is_that_videos_error_and_the_next_video_decodes(
        main_module, monkeypatch):
    """An exception the decoder does not expect (here cv2.error, as the OpenCV fallback can raise)
    ends only that video, recorded with the traceback's last line and where it happened; the
    decoder goes on, and its next video decodes in full."""
    import cv2
    info = probe(main_module, OBAMA)
    real, calls = decode_frames, []

    def first_video_fails(info, frame_interval):
        calls.append(info.path)
        for frame_idx, time_s, image in real(info, frame_interval):
            if len(calls) == 1 and frame_idx == 5:
                raise cv2.error("OpenCV(4.9.0) color.cpp:196: error: (-215:Assertion failed) "
                                "!_src.empty() in function 'cvtColor'\n")
            yield frame_idx, time_s, image
    monkeypatch.setattr("findpeople.decode.decode_frames", first_video_fails)
    (sent, error), frames = decode_with_fake_ring(main_module, info)
    assert sent == len(frames) == 5, (sent, error)
    assert error.startswith(f"{OBAMA}: decoding failed after 5 processed frames (cv2.error: "
                            f"OpenCV(4.9.0) color.cpp:196: error: (-215:Assertion failed) "
                            f"!_src.empty() in function 'cvtColor'; at test_decode.py:"), error
    assert "in first_video_fails); the rest was not searched" in error, error
    assert decode_with_fake_ring(main_module, info)[0] == (60, None), "the next video"


def fake_pictures(kind: str, count: int = 60) -> list:
    """count pictures (60x80) of a kind: black, frozen, dim (near-black, changing), moving,
    still-then-moving."""
    rng = np.random.default_rng(7)
    still = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    if kind == "black":
        return [np.zeros((60, 80, 3), np.uint8)] * count
    if kind == "frozen":
        return [still] * count
    if kind == "dim":  # blank pictures that still change: 0, 1, 2, ... grey levels
        return [np.full((60, 80, 3), i % 3, np.uint8) for i in range(count)]
    moving = [rng.integers(0, 255, (60, 80, 3), dtype=np.uint8) for _ in range(count)]
    return moving if kind == "moving" else [still] * (count // 2) + moving[count // 2:]


@pytest.mark.parametrize("kind, frame_count, warned", [
    ("black", 60, True), ("frozen", 60, True), ("dim", 60, True), ("moving", 60, False),
    ("still-then-moving", 60, False), ("black", 30, False),  # 2 samples: too few to judge
])
def test_a_video_whose_every_picture_is_blank_or_frozen_is_an_error(main_module, monkeypatch, kind,
                                                                    frame_count, warned):
    """The decoder samples about one picture per second through the whole video: if every sample
    (at least 3) is blank or frozen, the video gets an error saying 'nobody found' may be wrong
    (its exit code is then 1); a video with a picture that changes gets none."""
    info = probe(main_module, OBAMA)
    pictures = fake_pictures(kind, frame_count)
    monkeypatch.setattr("findpeople.decode.decode_frames", lambda info, frame_interval: (
        (i, i / 15, picture) for i, picture in enumerate(pictures)))
    (sent, error), _ = decode_with_fake_ring(main_module, info)
    assert sent == frame_count
    if warned:
        assert error == (f"{OBAMA}: every picture was blank or frozen (4 sampled, about 1 s apart): "
                         f"'nobody found' may be wrong; check that the file plays in a video player, "
                         f"and if it does, re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4) and "
                         f"search that"), error
    else:
        assert error is None, error


def test_an_8k_video_decodes_through_the_ring_at_full_size(main_module, matrix_dir, ffmpeg_exe,
                                                           cpu_models, test_settings):
    """The 8K file (7680x4320) goes through decode_into_ring with a NumPy ring as large as the
    shared one would be: its frames arrive whole, equal to the ffmpeg command line's, and Obama's
    face is detected in them. This backs the README's 8K row where /dev/shm cannot hold the two
    slots the search needs (Docker's default 64 MB), and the run refuses it by name."""
    path = matrix_dir / "8k.mp4"
    info = probe(main_module, path)
    (sent, error), frames = decode_with_fake_ring(main_module, info, slot_count=4)
    assert (sent, error) == (3, None) and (info.width, info.height) == (7680, 4320)
    first = next(cli_frames(ffmpeg_exe, path, info.width, info.height))
    assert np.array_equal(frames[0][2], first), "the 8K frame differs from ffmpeg's"
    boxes, _ = detect_faces(cpu_models, [frames[0][2]], test_settings)[0]
    assert (boxes[:, 4] >= 0.5).any(), f"no face found in the 8K frame: {boxes}"
