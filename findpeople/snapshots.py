"""Snapshots: the frames of a video's best looks decoded again at search time, boxed and labelled.

Runs in the parent's finisher thread after a video is searched. In: the looks chosen for
snapshots (naming.snapshot_looks: frame time, box, distance) of each named track. Out: one JPEG
per look in OUTPUT_DIR/<video folder>/ (outputs.snapshot_path), the frame as the index stage saw
it (deinterlaced, turned). The index keeps no pictures: a snapshot costs a seek and the decoding
of a few frames, only for the people searched, and nothing per hour of video indexed.
"""
from __future__ import annotations

from .decode import VideoInfo, bob_deinterlace, decoded_frames, frame_time_s, to_display


SEEK_AHEAD_S = 5.0  # frames_at seeks rather than decode more than this far ahead


def frames_at(info: VideoInfo, times_s: list) -> dict:
    """Return {time_s: BGR image as displayed} of the frames at these exact times (as the index
    stage decoded them: deinterlaced, turned), decoding from the keyframe before each one that
    is more than SEEK_AHEAD_S after the last decoded frame; a time no frame has is left out.
    For snapshots made at search time: a few frames, not a whole video."""
    import av
    pending, found = sorted(set(times_s)), {}
    tolerance_s = min(1e-3, 0.25 / info.fps) if info.fps > 0 else 1e-3
    with av.open(info.path) as container:
        stream = container.streams.video[info.video_stream_idx]
        stream.thread_type = "AUTO"
        while pending:
            container.seek(info.origin_pts + int(pending[0] / info.time_base), backward=True,
                           any_frame=False, stream=stream)
            last_s = decode_wanted(container, stream, info, pending, found, tolerance_s)
            if last_s is None:
                break
            pending = [t for t in pending if t not in found and t > last_s + tolerance_s]
    return found


def decode_wanted(container, stream, info: VideoInfo, pending: list, found: dict,
                  tolerance_s: float) -> float | None:
    """Decode from the container's position, keeping the frames at the pending times in found;
    return the last decoded frame's time once the first pending time is passed and the next is
    more than SEEK_AHEAD_S ahead (to seek there), or None when the stream ends or passes them
    all."""
    damaged = []
    for frame in decoded_frames(container, stream, damaged):
        if frame.pts is None:
            continue
        time_s = frame_time_s(frame.pts, info.origin_pts, info.time_base)
        left = [t for t in pending if t not in found and t >= time_s - tolerance_s]
        if not left:
            return None
        if time_s >= pending[0] - tolerance_s and left[0] - time_s > SEEK_AHEAD_S:
            return time_s
        if abs(left[0] - time_s) <= tolerance_s:
            image = frame.to_ndarray(format="bgr24")
            image = bob_deinterlace(image) if frame.interlaced_frame else image
            found[left[0]] = to_display(image, info.rotation_deg)
    return None
