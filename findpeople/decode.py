"""Decoding: probe videos, then decode frames into the ring (decoder processes).

In the parent: `probe_video` turns each file `folders.list_videos` found into a `VideoInfo`
record (size, rotation, time base, first-frame offset, the file's size and time when probed) or
names the bad file. In each decoder process (`decoder_main`, NUM_CPU_LOADERS of them): take a
video from jobs_q, decode it with PyAV (OpenCV as fallback; rotation applied, interlaced frames
deinterlaced), write every FRAME_INTERVAL-th frame into a free ring slot and put (video_idx, seq,
frame_idx, time_s, height, width, slot) on the video's worker's filled queue, then an end marker.
Times come from each frame's presentation timestamp, in seconds from the first frame; never
frame_idx / fps. At the end of a video, a file that changed since it was probed, or that held
less or more than its header said, makes that video's error.
"""
from __future__ import annotations

import itertools
import math
import os
import time
import traceback
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import BadInput
from .folders import listed_only_to_be_named
from .ring import StageClock, get_with_stop, parent_gone, run_child, write_slot


_DECODER_CHECK_FRAMES = 8  # first kept frames checked for a decoder that returns blank/stale pictures
_DECODER_CHECK_BYTES = 128 * 2**20  # ... but no more than fit in this (at least 2 frames: 8K is 100 MB)
_BLANK_STD_GREY = 2.0  # grey levels: a picture whose spread is below this is blank (black, green, grey)
_FROZEN_MAD_GREY = 0.5  # grey levels: pictures closer than this (mean difference) are the same picture
_PICTURE_SAMPLE_S = 1.0  # s: the decoder samples a picture this often (videos all blank or frozen)
_MIN_PICTURE_SAMPLES = 3  # ... and judges only videos with at least this many samples


@dataclass(frozen=True)
class VideoInfo:
    """What the probe learnt about one video; times in seconds."""

    idx: int  # position in this run's video list
    path: str
    output_name: str  # folder name under OUTPUT_DIR (the stem, made unique)
    width: int  # px, as displayed (after rotation_deg)
    height: int  # px, as displayed
    fps: float  # average frame rate, for display and frame durations only
    frame_count: int  # from the header; an estimate when the header has none
    duration_s: float  # of the video stream, from its first frame
    time_base: Fraction  # of the video stream
    origin_pts: int  # pts of the first video frame: time 0
    video_start_offset_s: float  # video start minus container start (Hamilton clip: 0.844)
    has_audio: bool
    rotation_deg: int = 0  # 0/90/180/270: decoded frames are turned this far counter-clockwise
    frame_count_from_header: bool = False  # frame_count is the header's count, not an estimate
    video_stream_idx: int = 0  # which of the container's video streams (a cover picture is skipped)
    file_bytes: int | None = None  # the file's size when it was probed (None: not probed)
    file_mtime_ns: int | None = None  # ... and its modification time, in ns


def read_head(path: Path) -> bytes:
    """Return the first 64 bytes of a file; raise BadInput for a folder, an unreadable or an
    empty file, saying what to do."""
    if path.is_dir():
        raise BadInput(f"{path}: is a folder named like a video, not a video; the videos inside it "
                       f"are searched. Rename the folder (without '{path.suffix}') to silence this")
    try:
        with open(path, "rb") as file:
            head = file.read(64)
    except PermissionError:
        raise BadInput(f"{path}: permission denied, this user cannot read it; make it readable "
                       f"(chmod a+r, or ask its owner), or remove it from the folder") from None
    except OSError as error:  # EIO from a failing disk or network share, a broken link, ...
        raise BadInput(f"{path}: cannot be read ({error.strerror or error}); check the disk or "
                       f"the network share it is on (dmesg lists read errors), copy it again, or "
                       f"remove it from the folder") from None
    if not head:
        raise BadInput(f"{path}: is empty (0 bytes), probably an unfinished copy or download; copy "
                       f"it again, or remove it from the folder")
    return head


def describe_content(head: bytes) -> str | None:
    """Return what a file's first bytes show it to be ("a text file", "a JPEG image", "an MP4/MOV
    file", ...), or None when they do not tell."""
    signatures = [(b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"),
                  (b"GIF8", "a GIF image"), (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive")]
    for signature, what in signatures:
        if head.startswith(signature):
            return what
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):
        return "an MP4/MOV file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:  # the 64 bytes may end inside a character
        text = head[:error.start].decode("utf-8") if error.start >= len(head) - 3 else ""
    return "a text file" if text and all(c.isprintable() or c in "\r\n\t" for c in text) else None


def unreadable_message(path: Path, head: bytes, error: Exception) -> str:
    """Return the message for a file ffmpeg cannot open: what it is, and what to do."""
    what = describe_content(head)
    if what == "an MP4/MOV file":
        return (f"{path}: is an MP4/MOV file that ffmpeg cannot read ({error}); it is truncated "
                f"(its index, the 'moov' atom, is missing when a download or recording did not "
                f"finish) or damaged: copy it again, or repair it (e.g. with untrunc)")
    if what is not None:
        photo_hint = " (photos of people belong in the reference folder)" if "image" in what else ""
        return f"{path}: is {what}, not a video; remove it from the video folder{photo_hint}"
    return (f"{path}: cannot be opened as a video ({error}); check that it plays in a video "
            f"player: if it does not, it is damaged, so copy it again or remove it from the folder")


def probe_video(path: Path, idx: int, output_name: str) -> VideoInfo:
    """Return the video's facts from its headers and first frame, and the file's size and time
    then; raise BadInput naming the file, what is wrong and what to do."""
    import av
    if problem := listed_only_to_be_named(path):
        raise BadInput(problem)
    head = read_head(path)
    status = path.stat()  # before it is opened: a change from here on is seen at its end
    try:
        with av.open(str(path)) as container:
            stream = video_stream_of(path, container)
            refuse_raw_stream(path, container, stream)
            first = first_frame(path, container, stream)
            info = video_info(path, idx, output_name, container, stream, first)
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise BadInput(unreadable_message(path, head, error)) from None
    return replace(info, file_bytes=status.st_size, file_mtime_ns=status.st_mtime_ns)


def first_frame(path: Path, container, stream):
    """Return the first decodable frame (its pts is time 0, its rotation the display rotation);
    raise BadInput when no frame can be decoded."""
    damaged_pts = []
    first = next(decoded_frames(container, stream, damaged_pts), None)
    if first is None:
        reason = f" ({len(damaged_pts)} damaged packets)" if damaged_pts else ""
        raise BadInput(f"{path}: no frame can be decoded{reason}; the file is truncated or "
                       f"damaged: copy it again, or remove it from the folder")
    return first


def refuse_raw_stream(path: Path, container, stream) -> None:
    """Raise BadInput for a raw video stream (H.264, HEVC, MPEG video without a container, whatever
    its name): it has no timestamps, so ffmpeg assumes 25 fps and every time would be a guess."""
    import av
    if not container.format.flags & av.format.Flags.no_timestamps.value:
        return
    rate = stream.codec_context.framerate  # what the stream's own header says, if anything
    how = f", {float(rate):g} fps as the stream itself says: ffmpeg -framerate {float(rate):g} " \
        f"-i IN -c copy OUT.mp4" if rate else \
        ": ffmpeg -framerate 30 -i IN -c copy OUT.mp4 with its real frame rate for 30"
    raise BadInput(f"{path}: is {container.format.long_name} without a container, not a video "
                   f"file: it has no timestamps, so the times of what is found could not be "
                   f"known; put it in a container at its frame rate{how}, and search that")


def video_stream_of(path: Path, container):
    """Return the container's first video stream that is not a cover picture; raise BadInput for
    an audio-only file (with or without a cover picture) or a still image."""
    import av
    cover = av.stream.Disposition.attached_pic  # a song's cover art, stored as a video stream
    covers = [s for s in container.streams.video if s.disposition & cover]
    moving = [s for s in container.streams.video if s not in covers]
    if not moving:
        audio = [s.codec_context.name for s in container.streams.audio]
        what = f"audio only: {', '.join(audio)}" if audio else "no audio either"
        what += ", with a cover picture" if covers else ""
        raise BadInput(f"{path}: has no video stream ({what}), so there is nothing to search; "
                       f"remove it from the folder")
    if container.format.name.endswith("_pipe") or container.format.name == "image2":
        raise BadInput(f"{path}: is a still image ({container.format.name}), not a video; remove "
                       f"it from the video folder (photos of people belong in the reference folder)")
    stream = moving[0]
    if not stream.width or not stream.height:
        raise BadInput(f"{path}: video stream has no frame size; the file may be damaged")
    return stream


def video_info(path: Path, idx: int, output_name: str, container, stream, first) -> VideoInfo:
    """Return the VideoInfo of an open video whose first frame is `first`; width and height are as
    displayed (rotated)."""
    time_base = Fraction(stream.time_base)
    origin_pts = first.pts if first.pts is not None else (stream.start_time or 0)
    fps = float(stream.average_rate or stream.guessed_rate or 25)
    duration_s = stream_duration_s(container, stream, float(origin_pts * time_base))
    rotation_deg = display_rotation_deg(first.rotation)
    width, height = (stream.height, stream.width) if rotation_deg in (90, 270) else \
        (stream.width, stream.height)
    return VideoInfo(
        idx=idx, path=str(path), output_name=output_name, width=width, height=height, fps=fps,
        frame_count=stream.frames or int(round(duration_s * fps)), duration_s=duration_s,
        time_base=time_base, origin_pts=origin_pts,
        video_start_offset_s=float(origin_pts * time_base) - (container.start_time or 0) / 10**6,
        has_audio=bool(container.streams.audio), rotation_deg=rotation_deg,
        frame_count_from_header=bool(stream.frames),
        video_stream_idx=list(container.streams.video).index(stream))


def stream_duration_s(container, stream, origin_s: float) -> float:
    """Return the video's length in s: the video stream's duration, or, where the stream does not
    say, from its first frame (at origin_s) to the container's end; 0 when neither says."""
    if stream.duration:
        return float(stream.duration * Fraction(stream.time_base))
    if container.duration:
        return max(0.0, ((container.start_time or 0) + container.duration) / 1_000_000 - origin_s)
    return 0.0


def display_rotation_deg(rotation: float) -> int:
    """Return a display matrix's rotation (degrees counter-clockwise, -180..180, as PyAV's
    frame.rotation gives it) as 0, 90, 180 or 270."""
    return int(round(rotation / 90)) % 4 * 90


def frame_time_s(pts: int, origin_pts: int, time_base: Fraction) -> float:
    """Return a frame's time in seconds from the first video frame (exact until this conversion)."""
    return float((pts - origin_pts) * time_base)


def to_display(image: np.ndarray, rotation_deg: int) -> np.ndarray:
    """Return a decoded image turned counter-clockwise by rotation_deg, as players show it."""
    return np.ascontiguousarray(np.rot90(image, rotation_deg // 90)) if rotation_deg else image


def bob_deinterlace(image: np.ndarray) -> np.ndarray:
    """Return an interlaced frame's top field (its even lines) stretched to full height: the
    picture of one instant, without the combing that two fields woven together show."""
    import cv2
    return cv2.resize(image[0::2], (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)


def pyav_frames(info: VideoInfo, frame_interval: int, damaged_pts: list):
    """Yield (frame_idx, time_s, BGR array as displayed, or None for a frame that is not kept)
    for every frame PyAV decodes; interlaced frames are deinterlaced (bob). Packets the decoder
    rejects are skipped, as the ffmpeg command line does, and their pts added to damaged_pts."""
    import av
    with av.open(info.path) as container:
        stream = container.streams.video[info.video_stream_idx]
        stream.thread_type = "AUTO"
        last_pts = None
        frame_duration = 1 / Fraction(info.fps).limit_denominator(100000) / info.time_base
        for frame_idx, frame in enumerate(decoded_frames(container, stream, damaged_pts)):
            pts = frame.pts
            if pts is None:  # rare: a frame without a timestamp follows its predecessor
                pts = info.origin_pts if last_pts is None else last_pts + int(frame_duration)
            last_pts = pts
            image = None
            if frame_idx % frame_interval == 0:
                image = frame.to_ndarray(format="bgr24")
                if frame.interlaced_frame:
                    image = bob_deinterlace(image)
                image = to_display(image, info.rotation_deg)
            yield frame_idx, frame_time_s(pts, info.origin_pts, info.time_base), image


def decoded_frames(container, stream, damaged_pts: list):
    """Yield the frames of one stream of an open container, skipping the packets the decoder
    rejects (their pts go to damaged_pts), as the ffmpeg command line does."""
    for packet in container.demux(stream):
        yield from decode_packet(packet, damaged_pts)


def decode_packet(packet, damaged_pts: list) -> list:
    """Return the frames one packet decodes to; a packet the decoder rejects as invalid data
    gives none, and its pts is added to damaged_pts."""
    import av
    try:
        return packet.decode()
    except av.error.InvalidDataError:
        damaged_pts.append(packet.pts)
        return []


def packet_times_s(info: VideoInfo, keyframes_only: bool = False) -> list:
    """Return the sorted times (s, frame clock) of the video stream's packets (every frame's exact
    timestamp), or of its keyframes only, read without decoding."""
    import av
    with av.open(info.path) as container:
        stream = container.streams.video[info.video_stream_idx]
        return sorted(frame_time_s(packet.pts, info.origin_pts, info.time_base)
                      for packet in container.demux(stream)
                      if packet.pts is not None and (packet.is_keyframe or not keyframes_only))


def nearest_time_s(times_s: list, approx_s: float, tolerance_s: float) -> float:
    """Return the time in sorted times_s nearest to approx_s, or approx_s itself when none is
    within tolerance_s."""
    import bisect
    i = bisect.bisect_left(times_s, approx_s)
    near = [t for t in times_s[max(0, i - 1):i + 1] if abs(t - approx_s) <= tolerance_s]
    return min(near, key=lambda t: abs(t - approx_s)) if near else approx_s


def opencv_frames(info: VideoInfo, frame_interval: int):
    """Yield what pyav_frames yields, decoded by OpenCV (the fallback decoder). Each time is the
    packet timestamp (exact, read by PyAV's demuxer) nearest to OpenCV's position counted from its
    first frame (OpenCV counts from the stream's start, which can be a frame earlier); OpenCV's
    own where no packet is within half a frame."""
    import cv2
    times_s = packet_times_s(info)
    capture = cv2.VideoCapture(info.path, cv2.CAP_FFMPEG)
    capture.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)  # rotated below, exactly as PyAV's frames
    try:
        frame_idx, first_s = 0, None
        while capture.grab():
            position_s = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000
            first_s = position_s if first_s is None else first_s
            time_s = nearest_time_s(times_s, position_s - first_s, 0.5 / info.fps)
            image = None
            if frame_idx % frame_interval == 0:
                ok, image = capture.retrieve()
                image = to_display(image, info.rotation_deg) if ok else None
            yield frame_idx, time_s, image
            frame_idx += 1
    finally:
        capture.release()


def grey_sample(image: np.ndarray) -> np.ndarray:
    """Return every 8th pixel of every 8th row as grey levels (float32): enough to tell a blank
    or repeated picture."""
    return image[::8, ::8].mean(axis=2, dtype=np.float32)


def frames_look_broken(images: list) -> bool:
    """Return True when there is no picture, every picture is blank (near-uniform: black, green,
    grey), or they are all the same picture (a decoder repeating a stale frame)."""
    if not images:
        return True
    grey = [grey_sample(image) for image in images]
    if all(g.std() < _BLANK_STD_GREY for g in grey):
        return True
    return len(grey) > 1 and all(np.abs(g - grey[0]).mean() < _FROZEN_MAD_GREY for g in grey[1:])


class PictureSampler:
    """Samples about one picture per second of a video to tell whether every one was blank or
    frozen: a decoder returning success with such pictures makes 'nobody found' look like a
    result (the first frames are checked in working_decoder_frames; this covers the rest). Keeps
    only the last sample."""

    def __init__(self):
        self.count, self.alive, self.next_s, self.previous = 0, False, -math.inf, None

    def add(self, time_s: float, image: np.ndarray) -> None:
        """Sample this picture if a sample is due at time_s (s)."""
        if time_s < self.next_s:
            return
        self.next_s = time_s + _PICTURE_SAMPLE_S
        grey = grey_sample(image)
        blank = bool(grey.std() < _BLANK_STD_GREY)
        if self.previous is not None:  # alive: the picture changed, and not from blank to blank
            changed = float(np.abs(grey - self.previous[0]).mean()) >= _FROZEN_MAD_GREY
            self.alive |= changed and not (blank and self.previous[1])
        self.previous, self.count = (grey, blank), self.count + 1

    def problem(self, info: VideoInfo) -> str | None:
        """Return the message for a video whose samples (at least _MIN_PICTURE_SAMPLES) were all
        blank or frozen; None otherwise."""
        if self.count < _MIN_PICTURE_SAMPLES or self.alive:
            return None
        return (f"{info.path}: every picture was blank or frozen ({self.count} sampled, about "
                f"{_PICTURE_SAMPLE_S:g} s apart): 'nobody found' may be wrong; check that the file "
                f"plays in a video player, and if it does, re-encode it (ffmpeg -i IN -c:v libx264 "
                f"OUT.mp4) and search that")


def take_kept(frames, count: int) -> list:
    """Return the next items of a frame iterator, up to and including its count-th kept image."""
    taken = []
    for item in frames:
        taken.append(item)
        if sum(image is not None for _, _, image in taken) >= count:
            break
    return taken


def working_decoder_frames(info: VideoInfo, frame_interval: int, damaged_pts: list):
    """Return an iterator like pyav_frames': PyAV's frames, or OpenCV's when PyAV's first kept
    frames look broken (blank or frozen) and OpenCV's do not. A video that really opens on black
    or on a still picture looks the same in both, so it stays with PyAV."""
    primary = pyav_frames(info, frame_interval, damaged_pts)
    frame_bytes = info.width * info.height * 3
    head = take_kept(primary, max(2, min(_DECODER_CHECK_FRAMES, _DECODER_CHECK_BYTES // frame_bytes)))
    images = [image for _, _, image in head if image is not None]
    if not images or not frames_look_broken(images):  # no frame at all: decode_frames reports it
        return itertools.chain(head, primary)
    fallback = opencv_frames(info, frame_interval)
    fallback_head = take_kept(fallback, max(1, len(images)))
    if frames_look_broken([image for _, _, image in fallback_head if image is not None]):
        fallback.close()
        return itertools.chain(head, primary)
    primary.close()
    damaged_pts.clear()
    print(f"[!] {info.path}: PyAV decoded only blank or frozen pictures at the start, where "
          f"OpenCV's decoder shows a picture: this video is decoded with OpenCV", flush=True)
    return itertools.chain(fallback_head, fallback)


def decoding_problem(info: VideoInfo, decoded_count: int, last_time_s: float,
                     damaged_pts: list) -> str | None:
    """Return the message for a video whose decoding ended well before its header's frame count
    (or, without one, its duration), or skipped damaged packets; None when neither happened."""
    problems = []
    if info.frame_count_from_header:  # a damaged packet explains one missing frame
        early = decoded_count + len(damaged_pts) < info.frame_count - max(2, info.frame_count // 100)
    else:
        early = last_time_s + 1 / info.fps < info.duration_s - max(2.0, 0.1 * info.duration_s)
    if early:
        problems.append(f"decoding stopped at {last_time_s:.2f} s of {info.duration_s:.2f} s "
                        f"({decoded_count} of {info.frame_count} frames): the file is truncated, "
                        f"and the rest was not searched")
    if damaged_pts:
        times_s = sorted(frame_time_s(p, info.origin_pts, info.time_base)
                         for p in damaged_pts if p is not None)
        where = f" (at {', '.join(f'{t:.2f}' for t in times_s[:5])} s)" if times_s else ""
        problems.append(f"{len(damaged_pts)} damaged packet(s) could not be decoded{where}: the "
                        f"frames around them were not searched")
    if not problems:
        return None
    return (f"{info.path}: {'; '.join(problems)}. Copy the file again, or re-encode the readable "
            f"part (ffmpeg -i IN -c:v libx264 OUT.mp4) to silence this")


def longer_than_probed(info: VideoInfo, decoded_count: int, last_time_s: float) -> str | None:
    """Return the message for a video that held far more than its header said when it was probed:
    more frames than its frame count (by more than 2 frames and 1 %), or, without a count, frames
    past its duration (by more than 2 s and 10 %, as for one that ends early); None otherwise."""
    if info.frame_count_from_header:
        late = decoded_count > info.frame_count + max(2, info.frame_count // 100)
    else:
        late = info.duration_s > 0 and \
            last_time_s > info.duration_s + max(2.0, 0.1 * info.duration_s)
    if not late:
        return None
    return (f"{info.path}: holds more than it did when it was opened: decoding went on to "
            f"{last_time_s:.2f} s, past the {info.duration_s:.2f} s its header said then "
            f"({decoded_count} frames, {info.frame_count} expected), so the file grew while it was "
            f"searched (a copy or recording still going on), or its header is wrong. Run again "
            f"once the file is complete; if this stays, re-mux it (ffmpeg -i IN -c copy OUT.mkv) "
            f"and search that")


def file_change_problem(info: VideoInfo) -> str | None:
    """Return the message for a video file whose size or modification time is not what they were
    when it was probed (a copy or recording still going on, or a file replaced); None when they
    are, or when it was not probed."""
    if info.file_bytes is None:
        return None
    try:
        status = os.stat(info.path)
    except OSError as error:
        now = f"it cannot be found any more ({error.strerror or error})"
    else:
        if (status.st_size, status.st_mtime_ns) == (info.file_bytes, info.file_mtime_ns):
            return None
        now = f"{status.st_size} bytes now" if status.st_size != info.file_bytes else \
            "the same size, but written to since"
    return (f"{info.path}: changed while it was searched ({info.file_bytes} bytes when it was "
            f"opened, {now}): it is still being copied or recorded, or was replaced, so what was "
            f"searched may not be all of it. Run again once the file is complete: it is then "
            f"searched again")


def decode_frames(info: VideoInfo, frame_interval: int):
    """Yield (frame_idx, time_s, BGR array as displayed) for every frame_interval-th decoded
    frame; at the end, raise BadInput if the file changed since it was probed, held more or less
    than its header said, or was damaged."""
    decoded_count, last_time_s, damaged_pts = 0, 0.0, []
    for frame_idx, time_s, image in working_decoder_frames(info, frame_interval, damaged_pts):
        decoded_count, last_time_s = frame_idx + 1, time_s
        if image is not None:
            yield frame_idx, time_s, image
    problem = file_change_problem(info) or longer_than_probed(info, decoded_count, last_time_s) \
        or decoding_problem(info, decoded_count, last_time_s, damaged_pts)
    if problem:
        raise BadInput(problem)


def decoder_main(name, layout, jobs_q, free_q, filled_qs, result_q, stop_event, frame_interval):
    """Decode each video from jobs_q into ring slots; report per video; exit on a None job.

    All frames of a video go to one worker's queue (filled_qs[video_idx % workers]), in order,
    followed by an end marker, because that worker follows the video's faces frame by frame.
    """
    def body(ring):
        clock = StageClock()
        while (info := get_with_stop(jobs_q, stop_event)) is not None:
            result_q.put(("video_start", name, info.idx))
            filled_q = filled_qs[info.idx % len(filled_qs)]
            sent, error = decode_into_ring(info, ring, free_q, filled_q, stop_event, frame_interval,
                                           clock)
            if not stop_event.is_set():
                filled_q.put((info.idx, sent, None, None, 0, 0, None))  # end marker
            result_q.put(("video_done", info.idx, sent, error))
        for filled_q in filled_qs:  # flush every frame into the pipes before saying "done": the
            filled_q.close()  # parent then sends the workers' stop sentinels, which must come last
            if not parent_gone():
                filled_q.join_thread()
        result_q.put(("stats", name, clock.report()))
    run_child(name, layout, result_q, (free_q, *filled_qs), body)


def decode_into_ring(info, ring, free_q, filled_q, stop_event, frame_interval,
                     clock: StageClock) -> tuple:
    """Return (frames sent, error text or None) after streaming one video into the ring. Any
    failure is this video's error alone (the decoder goes on with the next video), and so are
    pictures that were all blank or frozen (see PictureSampler)."""
    import av
    sent, pictures, error = 0, PictureSampler(), None
    try:
        started = time.perf_counter()
        for frame_idx, time_s, image in decode_frames(info, frame_interval):
            clock.add("decode", time.perf_counter() - started)
            if image.size > ring[0].size:
                error = (f"{info.path}: frame {frame_idx} is {image.shape[1]}x{image.shape[0]}, "
                         f"larger than the header said; the rest of the video was skipped")
                break
            pictures.add(time_s, image)
            frame = (sent, frame_idx, time_s, image)
            if not send_frame(info, ring, free_q, filled_q, stop_event, clock, frame):
                return sent, "stopped"
            sent += 1
            started = time.perf_counter()
    except (av.error.FFmpegError, OSError) as failure:
        error = (f"{info.path}: decoding stopped after {sent} processed frames ({failure}); the "
                 f"file is truncated or damaged and the rest was not searched; copy it again, or "
                 f"re-encode the readable part (ffmpeg -i IN -c:v libx264 OUT.mp4)")
    except BadInput as failure:  # decoding ended early or skipped damaged packets
        error = str(failure)
    except Exception as failure:  # e.g. cv2.error in the OpenCV fallback: this video's error only
        error = unexpected_decoding_error(info, sent, failure)
    problems = [problem for problem in (error, pictures.problem(info)) if problem]
    return sent, "; ".join(problems) or None


def send_frame(info, ring, free_q, filled_q, stop_event, clock: StageClock, frame: tuple) -> bool:
    """Copy one (seq, frame_idx, time_s, image) into a free ring slot and queue it for its worker;
    return False once the run is stopping (no slot taken)."""
    seq, frame_idx, time_s, image = frame
    waited = time.perf_counter()
    slot = get_with_stop(free_q, stop_event)
    if slot is None:
        return False
    clock.add("wait_for_slot", time.perf_counter() - waited)
    write_slot(ring, slot, image)
    filled_q.put((info.idx, seq, frame_idx, time_s, image.shape[0], image.shape[1], slot))
    return True


def unexpected_decoding_error(info, sent: int, error: Exception) -> str:
    """Return the message for an unexpected failure while decoding a video: the exception as a
    traceback's last line shows it, and the line of code where it happened."""
    where = traceback.extract_tb(error.__traceback__)[-1]
    last_line = " ".join(traceback.format_exception_only(type(error), error)[-1].split())
    return (f"{info.path}: decoding failed after {sent} processed frames ({last_line}; at "
            f"{Path(where.filename).name}:{where.lineno} in {where.name}); the rest was not "
            f"searched. Check that the file plays in a video player, or re-encode it (ffmpeg -i IN "
            f"-c:v libx264 OUT.mp4); if it plays, please report this message")
