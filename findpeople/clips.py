"""Ranges and clips: merge sightings into time ranges, then cut them with ffmpeg.

Runs in the parent (a clip thread). In: a person's sighting times in one video. Out: half-open
`TimeRange`s [start_s, end_s), clamped to the video, and one MP4 per range in
OUTPUT_DIR/<video>/clips/, written to a .part file and renamed. Commands are argument lists
built by pure functions; `run_checked` raises `ClipError` with ffmpeg's stderr. ffmpeg's -ss
counts from the container start: `container_seek_s` is the one place that converts.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ClipError
from .settings import Settings
from .outputs import fsync_file, safe_file_name
from .decode import VideoInfo


_KEYFRAME_SEEK_PAST_S = 0.001  # fast clips: seek this far past the keyframe, so ffmpeg starts on it


@dataclass(frozen=True)
class TimeRange:
    """A half-open interval [start_s, end_s) of one person in one video."""

    name: str
    start_s: float
    end_s: float
    best_distance: float
    first_sighting_s: float
    last_sighting_s: float


def merge_sightings(times_s: list, gap_s: float) -> list:
    """Return [(first_s, last_s)]: sightings closer than gap_s (strictly) join one range."""
    ranges = []
    for time_s in sorted(times_s):
        if ranges and time_s - ranges[-1][1] < gap_s:
            ranges[-1][1] = time_s
        else:
            ranges.append([time_s, time_s])
    return [tuple(r) for r in ranges]


def widen_range(first_s: float, last_s: float, frame_s: float, before_s: float, after_s: float,
                duration_s: float) -> tuple:
    """Return [start_s, end_s): the sightings' span plus one frame, widened, clamped to
    [0, duration_s]. A duration that ends at or before the last sighting is not trusted (the
    range then ends one frame after it); 0 means unknown."""
    start_s = max(0.0, first_s - before_s)
    end_s = last_s + frame_s + after_s
    if duration_s > 0:
        end_s = min(duration_s if duration_s > last_s else last_s + frame_s, end_s)
    return start_s, end_s


def person_ranges(name: str, sightings: list, info: VideoInfo, settings: Settings) -> list:
    """Return the TimeRanges of one person from their (time_s, distance) sightings."""
    frame_s = 1.0 / info.fps if info.fps > 0 else 0.0
    merged = []
    for first_s, last_s in merge_sightings([t for t, _ in sightings], settings.MERGE_GAP_TOLERANCE):
        start_s, end_s = widen_range(first_s, last_s, frame_s, settings.CLIP_DURATION_BEFORE,
                                     settings.CLIP_DURATION_AFTER, info.duration_s)
        if merged and start_s <= merged[-1][1]:  # widened ranges that overlap become one clip
            merged[-1] = [merged[-1][0], max(end_s, merged[-1][1]), merged[-1][2], last_s]
        else:
            merged.append([start_s, end_s, first_s, last_s])
    ranges = []
    for start_s, end_s, first_s, last_s in merged:
        inside = [d for t, d in sightings if first_s <= t <= last_s]
        ranges.append(TimeRange(name, start_s, end_s, min(inside), first_s, last_s))
    return ranges


def clip_file_name(time_range: TimeRange) -> str:
    """Return '[StartSec]s_[Name]_d[Distance].mp4'."""
    return f"{time_range.start_s:.2f}s_{safe_file_name(time_range.name)}_d{time_range.best_distance:.3f}.mp4"


def container_seek_s(time_s: float, info: VideoInfo) -> float:
    """Return ffmpeg's input -ss for a frame time: frame clock -> container clock."""
    return max(0.0, time_s + info.video_start_offset_s)


def build_clip_command(ffmpeg: str, info: VideoInfo, time_range: TimeRange, part_path: Path,
                       mode: str = "accurate", clip_start_s: float | None = None) -> list:
    """Return the ffmpeg argument list that cuts one range.

    accurate: re-encoded (H.264/AAC), starting exactly at the range's first frame.
    fast: stream copy from clip_start_s, the keyframe at or before the range's start (a copy can
    only start at a keyframe); seeking just past it makes ffmpeg start there.
    """
    common = [ffmpeg, "-nostdin", "-y", "-v", "error"]
    maps = ["-map", f"0:v:{info.video_stream_idx}", "-map", "0:a:0?"]
    if mode == "fast":
        seek_s = container_seek_s(clip_start_s, info) + _KEYFRAME_SEEK_PAST_S
        return [*common, "-ss", f"{seek_s:.3f}", "-i", info.path,
                "-t", f"{time_range.end_s - clip_start_s - _KEYFRAME_SEEK_PAST_S:.3f}", *maps,
                "-c", "copy", "-avoid_negative_ts", "make_zero", "-movflags", "+faststart",
                "-f", "mp4", str(part_path)]
    return [*common, "-ss", f"{container_seek_s(time_range.start_s, info):.3f}", "-i", info.path,
            "-t", f"{time_range.end_s - time_range.start_s:.3f}", *maps,
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-b:a", "160k", "-movflags", "+faststart", "-f", "mp4", str(part_path)]


def keyframe_before(keyframes_s: list, time_s: float) -> float:
    """Return the last keyframe time at or before time_s (0 when there is none)."""
    earlier = [k for k in keyframes_s if k <= time_s + 1e-6]
    return max(earlier) if earlier else 0.0


def own_process_group() -> dict:
    """Return the Popen arguments that start a command in its own process group, so a Ctrl-C in
    the terminal (SIGINT to the whole group) reaches only main.py, which then stops it."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def run_checked(cmd: list, what: str, timeout_s: float = 600, stop_event=None) -> None:
    """Run a command; raise ClipError with the exit code and stderr's last lines on failure,
    after timeout_s, or "stopped" once stop_event is set (the command is killed then)."""
    import tempfile
    stop_event = stop_event or threading.Event()  # never set: only the timeout ends it early
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty command cannot block
        try:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=stderr, **own_process_group())
        except OSError as error:
            raise ClipError(f"{what}: cannot run {cmd[0]} ({error})") from None
        deadline = time.monotonic() + timeout_s
        while process.poll() is None:
            if time.monotonic() > deadline or stop_event.is_set():
                process.kill()
                process.wait()
                reason = "stopped" if stop_event.is_set() else \
                    f"ffmpeg took longer than {timeout_s:.0f} s"
                raise ClipError(f"{what}: {reason}")
            time.sleep(0.05)
        if process.returncode != 0:
            if stop_event.is_set():  # it failed because the run is stopping: nothing else to say
                raise ClipError(f"{what}: stopped")
            stderr.seek(0)
            tail = "\n".join(stderr.read().decode(errors="replace").strip().splitlines()[-5:])
            raise ClipError(f"{what}: ffmpeg exit code {process.returncode}\n{tail}")


def cut_clip(ffmpeg: str, info: VideoInfo, time_range: TimeRange, clip_dir: Path,
             mode: str = "accurate", clip_start_s: float | None = None, stop_event=None) -> Path:
    """Write one clip via a .part file renamed into place; return its path."""
    clip_dir.mkdir(parents=True, exist_ok=True)
    final = clip_dir / clip_file_name(time_range)
    part = final.with_name(final.name + ".part")
    what = f"{Path(info.path).name} {time_range.start_s:.2f}-{time_range.end_s:.2f}s"
    try:
        run_checked(build_clip_command(ffmpeg, info, time_range, part, mode, clip_start_s), what,
                    stop_event=stop_event)
        fsync_file(part)  # on the disk before its name says it is finished
        os.replace(part, final)
    finally:
        part.unlink(missing_ok=True)
    return final


def find_ffmpeg(ffmpeg_dir: str) -> str | None:
    """Return the ffmpeg to use: FFMPEG_DIR/ffmpeg(.exe), then PATH, then imageio-ffmpeg's."""
    for name in ("ffmpeg.exe", "ffmpeg"):
        candidate = Path(ffmpeg_dir) / name
        if candidate.is_file():
            return str(candidate.resolve())
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return None
