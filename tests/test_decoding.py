"""Section 2, Decoding: pixels equal the ffmpeg command line's, times come from timestamps."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import TESTDATA, VIDEOS

MEDIA_INFO = json.loads((TESTDATA / "media_info.json").read_text())


def probe(main_module, path: Path):
    return main_module.probe_video(path, 0, path.stem)


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
    ours = main_module.decode_frames(info, 1)
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
    times = [t for _, t, _ in main_module.decode_frames(info, 1)]
    assert times[0] == 0.0
    assert info.video_start_offset_s == pytest.approx(0.844, abs=1e-3)
    expected_last = 274 * 100 / 2997
    assert times[-1] == pytest.approx(expected_last, abs=1e-3), f"last frame at {times[-1]}"
    assert all(b > a for a, b in zip(times, times[1:])), "times must increase"


def test_frame_interval_keeps_every_nth_frame(main_module):
    """FRAME_INTERVAL = 3 processes frames 0, 3, 6, ... and nothing else."""
    info = probe(main_module, TESTDATA / "videos" / "obama_whcd.mp4")
    indices = [i for i, _, _ in main_module.decode_frames(info, 3)]
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
    times = [t for _, t, _ in main_module.decode_frames(info, 1)]
    expected = [i * 0.12 for i in range(10)] + [1.2 + i * 0.04 for i in range(10)]
    assert len(times) == 20
    assert np.allclose(times, expected, atol=1.5e-3), f"times {np.round(times, 3).tolist()}"


@pytest.mark.parametrize("content", [b"", b"this is not a video\n" * 100], ids=["empty", "text"])
def test_a_file_that_is_not_a_video_is_reported_by_name(main_module, tmp_path, content):
    """probe_video raises BadInput naming the file for an empty or non-video file."""
    path = tmp_path / "holiday clip.mp4"
    path.write_bytes(content)
    with pytest.raises(main_module.BadInput, match="holiday clip.mp4"):
        probe(main_module, path)


def test_output_names_stay_unique_when_stems_clash(main_module):
    """a.mp4, a.mkv and sub/a.mp4 get different output folders; unique stems stay as they are."""
    root = Path("/videos")
    paths = [root / "a.mp4", root / "a.mkv", root / "sub" / "a.mp4", root / "b.mp4"]
    names = main_module.unique_output_names(paths, root)
    assert names == ["a_mp4", "a_mkv", "sub_a_mp4", "b"], names


def test_a_file_with_audio_but_no_video_is_reported_by_name(main_module, tmp_path, ffmpeg_exe):
    """An audio-only .mp4 raises BadInput naming the file and saying it has no video stream."""
    path = tmp_path / "only sound.mp4"
    subprocess.run([ffmpeg_exe, "-nostdin", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440",
                    "-t", "1", "-c:a", "aac", str(path)], check=True)
    with pytest.raises(main_module.BadInput, match="only sound.mp4.*no video stream"):
        main_module.probe_video(path, 0, path.stem)
