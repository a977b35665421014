"""Ranges and clips: merge sightings into time ranges, then cut them with ffmpeg.

Runs in the parent (a clip thread). In: a person's sighting times in one video. Out: half-open
`TimeRange`s [start_s, end_s), clamped to the video, and one MP4 per range in
OUTPUT_DIR/<video>/clips/, written to a .part file, read back (`clip_problem`: a video stream, a
first frame that decodes, the range's length), cut again the safe way if it is wrong, and only
then renamed. Commands are argument lists built by pure functions; `run_checked` raises
`ClipError` with ffmpeg's stderr. ffmpeg's -ss counts from the container start:
`container_seek_s` is the one place that converts.
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
from .decode import VideoInfo, decode_packet, frame_time_s


_KEYFRAME_SEEK_PAST_S = 0.001  # fast clips: seek this far past the keyframe, so ffmpeg starts on it
# ffmpeg's input -ss lands 3/23 s earlier in formats that seek by decoding time (Matroska, AVI; not
# MP4/MOV, which seek to presentation times) when a stream has B-frames (ffmpeg_demux.c's
# dts_heuristic): a fast clip's seek adds it, or the copy would start a keyframe too early.
_FFMPEG_DTS_SEEK_LEAD_S = 3 / 23
_AVFMT_SEEK_TO_PTS = 0x4000000  # libavformat's flag of the formats that seek to presentation times
# libx264 in yuv420p needs an even width and height: an odd one loses its last column (right edge)
# or row (bottom edge). Cropping, not padding: the clip shows only the video's own pixels, at the
# same coordinates. ffmpeg applies it after its own rotation, so it sees the displayed size.
_EVEN_SIZE_FILTER = "crop=trunc(iw/2)*2:trunc(ih/2)*2:0:0"
_CLIP_TOLERANCE_FRAMES = 2  # a clip's video may last this many frames more or less than expected
_CLIP_TOLERANCE_S = 0.01  # ... plus this (-t is given in ms; some containers keep ms timestamps)
_COPY_REORDER_FRAMES = 5  # a fast clip may hold this many frames more (reordering; +3 seen)
_CLIP_TIMEOUT_S = 600  # ffmpeg's limit for one clip; decoding from the start adds 2 s per s skipped


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
                       mode: str = "accurate", clip_start_s: float | None = None,
                       seek: str = "input", seek_lead_s: float = 0.0) -> list:
    """Return the ffmpeg argument list that cuts one range.

    accurate: re-encoded (H.264/AAC), starting exactly at the range's first frame; an odd width
    or height is cropped to even (_EVEN_SIZE_FILTER). seek "input" (-ss before -i) jumps to the
    keyframe before the start; seek "output" (-ss after -i) decodes from the file's start and
    drops the frames before it: slower, but it needs no index and no seekable timestamps.
    fast: stream copy from clip_start_s, the keyframe at or before the range's start (a copy can
    only start at a keyframe); seeking just past it (plus seek_lead_s, see input_seek_lead_s)
    makes ffmpeg start there.
    """
    common = [ffmpeg, "-nostdin", "-y", "-v", "error"]
    maps = ["-map", f"0:v:{info.video_stream_idx}", "-map", "0:a:0?"]
    if mode == "fast":
        past_s = _KEYFRAME_SEEK_PAST_S + seek_lead_s
        return [*common, "-ss", f"{container_seek_s(clip_start_s, info) + past_s:.3f}", "-i", info.path,
                "-t", f"{time_range.end_s - clip_start_s - past_s:.3f}", *maps,
                "-c", "copy", "-avoid_negative_ts", "make_zero", "-movflags", "+faststart",
                "-f", "mp4", str(part_path)]
    position = ["-ss", f"{container_seek_s(time_range.start_s, info):.3f}"]
    source = ["-i", info.path]
    return [*common, *(position + source if seek == "input" else source + position),
            "-t", f"{time_range.end_s - time_range.start_s:.3f}", *maps, "-vf", _EVEN_SIZE_FILTER,
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-b:a", "160k", "-movflags", "+faststart", "-f", "mp4", str(part_path)]


def input_seek_lead_s(path: str) -> float:
    """Return how much earlier than asked ffmpeg's input -ss lands in this file, in s: 3/23 when
    its format seeks by decoding time and a video stream has B-frames, else 0."""
    import av
    with av.open(path) as container:
        if container.format.flags & _AVFMT_SEEK_TO_PTS:
            return 0.0
        reorders = any(stream.codec_context.has_b_frames for stream in container.streams.video)
    return _FFMPEG_DTS_SEEK_LEAD_S if reorders else 0.0


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


def frame_duration_s(info: VideoInfo) -> float:
    """Return one frame's duration in s, from the average frame rate (25 fps when it has none)."""
    return 1 / info.fps if info.fps > 0 else 0.04


def source_video_s(info: VideoInfo, start_s: float, end_s: float) -> float | None:
    """Return how long the source's video lasts within [start_s, end_s) (frame clock): from its
    first frame there to the end of its last, read from the keyframe before start_s without
    decoding; shorter than the range where the video ends early (a header that promised more).
    None when that cannot be read: no timestamps in its packets, or an unreadable file."""
    import av
    try:
        with av.open(info.path) as container:
            stream = container.streams.video[info.video_stream_idx]
            try:
                container.seek(info.origin_pts + int(start_s / info.time_base), stream=stream)
            except av.error.FFmpegError:
                pass  # not seekable: read from the start
            span = packet_span_s(container.demux(stream), info, start_s, end_s)
    except (av.error.FFmpegError, OSError, IndexError):
        return None
    return None if span is None else span[1] - span[0]


def packet_span_s(packets, info: VideoInfo, start_s: float, end_s: float) -> tuple | None:
    """Return (first frame's time, last frame's end) in s of the packets whose time is in
    [start_s, end_s), or None when none is; packets come in decoding order."""
    first_s = last_end_s = None
    for packet in packets:
        if packet.pts is None:
            continue
        time_s = frame_time_s(packet.pts, info.origin_pts, info.time_base)
        if time_s > end_s + 1.0:  # past any frame reordering
            break
        if start_s - 1e-6 <= time_s < end_s - 1e-6:
            length_s = float(packet.duration * info.time_base) if packet.duration else \
                frame_duration_s(info)
            first_s = time_s if first_s is None else min(first_s, time_s)
            last_end_s = max(last_end_s or time_s, time_s + length_s)
    return None if first_s is None else (first_s, last_end_s)


def read_clip(path: Path) -> tuple:
    """Return (whether a clip has a video stream, whether a frame of it decodes, how long its video
    lasts in s: from its first packet to the end of its last), read with PyAV."""
    import av
    with av.open(str(path)) as container:
        if not container.streams.video:
            return False, False, 0.0
        stream = container.streams.video[0]
        frame_s = 1 / float(stream.average_rate) if stream.average_rate else 0.0
        decodes, first_s, end_s = False, None, None
        for packet in container.demux(stream):
            decodes = decodes or bool(decode_packet(packet, []))
            if packet.pts is not None:
                time_s = float(packet.pts * stream.time_base)
                length_s = float(packet.duration * stream.time_base) if packet.duration else frame_s
                first_s = time_s if first_s is None else min(first_s, time_s)
                end_s = max(end_s or time_s, time_s + length_s)
        return True, decodes, 0.0 if first_s is None else end_s - first_s


def clip_problem(path: Path, expected_s: float | None, frame_s: float,
                 mode: str = "accurate") -> str | None:
    """Return what is wrong with a clip, as words that follow "the clip", or None when it plays:
    it has a video stream, a frame of it decodes, and its video lasts expected_s (when known: see
    source_video_s) within _CLIP_TOLERANCE_FRAMES frames of frame_s s and _CLIP_TOLERANCE_S. A
    fast clip may also last up to _COPY_REORDER_FRAMES frames longer: a stream copy stops in
    decoding order, so frames shown before the range's end that are decoded after it come too."""
    import av
    try:
        has_video, decodes, lasts_s = read_clip(path)
    except (av.error.FFmpegError, OSError) as error:
        return f"cannot be read ({getattr(error, 'strerror', None) or error})"
    if not has_video:
        return "has no video stream"
    if not decodes:
        return "has no frame that decodes"
    tolerance_s = _CLIP_TOLERANCE_FRAMES * frame_s + _CLIP_TOLERANCE_S
    longer_s = tolerance_s + (_COPY_REORDER_FRAMES * frame_s if mode == "fast" else 0.0)
    if expected_s is not None and not -tolerance_s <= lasts_s - expected_s <= longer_s:
        return f"has {lasts_s:.3f} s of video where the video has {expected_s:.3f} s"
    return None


def cut_and_check(cmd: list, part: Path, what: str, check: tuple, timeout_s: float,
                  stop_event) -> str | None:
    """Run one cut into part; return what is wrong (ffmpeg's error, or clip_problem's with the
    arguments in check), or None when the clip is good; raise ClipError "stopped" when the run is
    stopping."""
    try:
        run_checked(cmd, what, timeout_s, stop_event)
    except ClipError as error:
        if stop_event is not None and stop_event.is_set():
            raise
        return str(error).removeprefix(f"{what}: ")
    problem = clip_problem(part, *check)
    return None if problem is None else f"ffmpeg exited 0, but the clip {problem}"


def cut_clip(ffmpeg: str, info: VideoInfo, time_range: TimeRange, clip_dir: Path,
             mode: str = "accurate", clip_start_s: float | None = None, stop_event=None) -> Path:
    """Write one clip via a .part file, check it (clip_problem) and rename it into place; return
    its path. An accurate clip that ffmpeg fails to cut, or that is wrong, is cut once more
    decoding from the file's start (seek "output"); raise ClipError saying what is still wrong."""
    clip_dir.mkdir(parents=True, exist_ok=True)
    final = clip_dir / clip_file_name(time_range)
    part = final.with_name(final.name + ".part")
    what = f"{Path(info.path).name} {time_range.start_s:.2f}-{time_range.end_s:.2f}s"
    start_s = clip_start_s if mode == "fast" else time_range.start_s
    check = (source_video_s(info, start_s, time_range.end_s), frame_duration_s(info), mode)
    try:
        lead_s = input_seek_lead_s(info.path) if mode == "fast" else 0.0
        problem = cut_and_check(build_clip_command(ffmpeg, info, time_range, part, mode, start_s,
                                                   seek_lead_s=lead_s),
                                part, what, check, _CLIP_TIMEOUT_S, stop_event)
        if problem is not None and mode != "fast":
            retry = cut_and_check(
                build_clip_command(ffmpeg, info, time_range, part, mode, start_s, seek="output"),
                part, what, check, _CLIP_TIMEOUT_S + 2 * time_range.start_s, stop_event)
            problem = None if retry is None else \
                f"{problem.splitlines()[0]}; cut again decoding from the start: {retry}"
        if problem is not None:
            raise ClipError(f"{what}: {problem}")
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
