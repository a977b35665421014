"""Tracks: link each video's faces into tracks and embed a few looks of each (the index stage).

Runs in the worker processes, one `VideoTracker` per video, fed frames in decode order by the
worker's FrameSequencer. In: per frame, the detections and the frame itself. Out: one ("track",
...) message to the parent per ended track: every face of it (frame, time, box, score) and its
looks (landmarks, face size, embedding). Nothing here knows the reference photos: which faces are
embedded, and when, is decided from the faces alone (recognition_due), and the index stores
enough for every naming rule to run at search time (naming.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
import numpy as np

from .settings import Settings
from .decode import VideoInfo
from .detect import SURE_FACE_SCORE, align_face, face_size_px
from .device import DeviceLook, embed_looks


# Face tracks: why each value, in the comment.
_LINK_MIN_IOU = 0.3  # a detection continues a track when their boxes overlap at least this much
_TOUCH_IOU = 0.05  # boxes overlapping more than this touch (see link_detections)
_SPLIT_MAX_SIMILARITY = 0.3  # cosine: a track's new embedding below this is someone else: split
_RELINK_MIN_SIMILARITY = 0.5  # cosine: a new face this close to a recently unseen track continues it
_FACE_CHANGE_LIMIT = 0.55  # mean change of a face's normalised 16x16 grey patch from one frame to
# the next that makes it due for recognition: on the shared clips the same face changed by at most
# 0.52 in 99 % of frames, while a different face differed by at least 0.55 in 99 % of pairs
_SHOT_CUT_MAD = 20.0  # grey levels: mean change of a 64x36 thumbnail; the shared clips' cuts: 27-31
_GROWTH_FOR_RECHECK = 1.3  # re-recognise when a face is this much larger than at its best look
_FRONTAL_GAIN_FOR_RECHECK = 0.25  # ... or this much more frontal (0 = profile, 1 = frontal)
_MAX_UNVERIFIED_S = 1.0  # s: a track is re-recognised at least this often


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the [len(a), len(b)] intersection-over-union of x1,y1,x2,y2 boxes."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def link_detections(track_boxes: np.ndarray, det_boxes: np.ndarray, min_iou: float) -> tuple:
    """Return ({det: track} greedy by overlap, set of ambiguous det indices).

    track_boxes are where each track is expected now (last box moved by its last motion). A
    detection is ambiguous when its second-best track overlaps it at least half as much as the
    best (or a track overlaps two detections so): faces crossing, where overlap alone cannot
    tell who is who. Neighbours in a crowd that merely touch are not ambiguous.
    """
    iou = box_iou(track_boxes, det_boxes)
    ambiguous = set()
    for matrix, axis in ((iou, 0), (iou.T, 1)):  # per detection, then per track
        if matrix.shape[0] < 2:
            continue
        top_two = -np.sort(-matrix, axis=0)[:2]
        close = (top_two[1] > _TOUCH_IOU) & (top_two[1] >= 0.5 * top_two[0])
        rows = np.nonzero(close)[0]
        ambiguous |= ({int(d) for d in rows} if axis == 0 else
                      {int(d) for t in rows for d in np.nonzero(iou[t] > _TOUCH_IOU)[0]})
    links = {}
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        t, d = divmod(int(flat), iou.shape[1])
        if iou[t, d] < min_iou:
            break
        if d not in links and t not in links.values():
            links[d] = t
    return links, ambiguous


def frontal_score(kps: np.ndarray) -> float:
    """Return 1 for a frontal face, 0 for a profile: how centred the nose is between the eyes."""
    eye_mid_x = (kps[0, 0] + kps[1, 0]) / 2
    half_span = max(abs(kps[1, 0] - kps[0, 0]) / 2, 1e-6)
    return float(max(0.0, 1.0 - abs(kps[2, 0] - eye_mid_x) / half_span))


def thumbnail(image: np.ndarray) -> np.ndarray:
    """Return a 64x36 grey thumbnail (float32) for shot-cut detection."""
    import cv2
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return cv2.resize(grey, (64, 36), interpolation=cv2.INTER_AREA).astype(np.float32)


def face_signature(image: np.ndarray, box) -> np.ndarray:
    """Return the face's box as a 16x16 grey patch, normalised to mean 0 and deviation 1."""
    import cv2
    height, width = image.shape[:2]
    x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
    x2, y2 = min(width, int(math.ceil(box[2]))), min(height, int(math.ceil(box[3])))
    if x2 - x1 < 2 or y2 - y1 < 2:
        return np.zeros((16, 16), np.float32)
    grey = cv2.cvtColor(np.ascontiguousarray(image[y1:y2, x1:x2]), cv2.COLOR_BGR2GRAY)
    patch = cv2.resize(grey, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32)
    return (patch - patch.mean()) / (patch.std() + 1e-3)


def face_changed(before: np.ndarray | None, now: np.ndarray) -> bool:
    """Return True when a track's face changed abruptly since the last frame (someone else?)."""
    return before is not None and float(np.abs(now - before).mean()) > _FACE_CHANGE_LIMIT


def is_shot_cut(previous: np.ndarray | None, current: np.ndarray) -> bool:
    """Return True when the picture changed as much as at a cut between shots."""
    return previous is not None and float(np.abs(current - previous).mean()) > _SHOT_CUT_MAD


@dataclass(eq=False)  # identity: a track is itself, whatever its contents
class Track:
    """One face followed across consecutive processed frames of one video."""

    track_id: int
    box: np.ndarray  # last x1,y1,x2,y2
    last_time_s: float
    last_seq: int  # processed-frame number it was last seen in
    motion: np.ndarray = field(default_factory=lambda: np.zeros(4, np.float32))  # box change per frame
    faces: list = field(default_factory=list)  # (frame_idx, time_s, x1, y1, x2, y2, score) per frame
    looks: list = field(default_factory=list)  # (frame_idx, kps [5, 2], face size px, embedding)
    embedding: np.ndarray | None = None  # of the latest look
    last_rec_seq: int = -(10 ** 9)
    best_size_px: float = 0.0
    best_frontal: float = 0.0
    signature: np.ndarray | None = None  # the face's grey patch in its last frame (face_signature)
    last_look: object = None  # its last frame's face, to embed when the track ends (last_recognition)
    last_kps: np.ndarray | None = None  # ... and that face's landmarks


def recognition_interval(track: Track, settings: Settings, max_interval: int | None = None) -> int:
    """Return the processed frames until a track's next scheduled recognition.

    The interval doubles with each recognition, up to 8x: a face seen several times (named, or
    clearly a stranger) needs little re-checking unless it grows or turns to the camera. It is
    capped at max_interval (about a second of video: see VideoTracker), the longest stretch a
    track's frames may go without a look (the most a sighting can rest on neighbours).
    """
    interval = settings.RECOGNITION_INTERVAL * 2 ** min(max(len(track.looks) - 1, 0), 3)
    return interval if max_interval is None else min(interval, max_interval)


def recognition_due(track: Track | None, size_px: float, frontal: float, det_score: float,
                    seq: int, ambiguous: bool, settings: Settings,
                    max_interval: int | None = None) -> bool:
    """Return True when this face of this track should go through the recognizer now."""
    if size_px < settings.MIN_FACE_SIZE:
        return False
    if track is None:  # a doubtful new detection waits one frame: many never come back
        return det_score >= SURE_FACE_SCORE
    if ambiguous or not track.looks:
        return True
    return (seq - track.last_rec_seq >= recognition_interval(track, settings, max_interval)
            or size_px >= track.best_size_px * _GROWTH_FOR_RECHECK
            or frontal >= track.best_frontal + _FRONTAL_GAIN_FOR_RECHECK)


class VideoTracker:
    """Follows the faces of one video frame by frame (in order) and embeds a few looks per track.

    It decides which faces go to the recognizer and calls emit(("track", video_idx, record))
    when a track ends (track_record). Not thread-safe: FrameSequencer serialises the calls.
    """

    def __init__(self, info: VideoInfo, context, emit):
        self.info, self.context, self.emit = info, context, emit
        self.settings = context.settings
        # Recognise a track at least about once a second of video (see recognition_interval).
        per_second = info.fps / self.settings.FRAME_INTERVAL if info.fps > 0 else 1.0
        self.max_interval = max(self.settings.RECOGNITION_INTERVAL,
                                int(round(per_second * _MAX_UNVERIFIED_S)))
        self.active: list = []
        # faces seen, those below MIN_FACE_SIZE, tracks ended, and tracks by their number of
        # looks: why a video found nobody (see reports.nobody_found_hint)
        self.counts = {"faces": 0, "small_faces": 0, "tracks": 0, "looks_per_track": {}}
        self.previous_thumb = None
        self.next_id = 0
        self.frame_handle = None  # the current frame on the models' device (see step)

    def step(self, seq: int, frame_idx: int, time_s: float, image: np.ndarray, boxes: np.ndarray,
             kps: np.ndarray, thumb: np.ndarray, handle: tuple | None = None) -> None:
        """Advance every track by one processed frame (handle: its copy on the models' device)."""
        self.frame_handle = handle
        if is_shot_cut(self.previous_thumb, thumb):
            self.end_tracks(list(self.active))
        self.previous_thumb = thumb
        self.end_tracks([t for t in self.active if time_s - t.last_time_s > self.settings.TRACK_MAX_GAP])
        expected = [t.box + t.motion * (seq - t.last_seq) for t in self.active]
        links, ambiguous = link_detections(np.array(expected).reshape(-1, 4), boxes[:, :4],
                                           _LINK_MIN_IOU)
        owners = {d: self.active[t] for d, t in links.items()}
        self.count_faces(boxes)
        signatures = [face_signature(image, box) for box in boxes]
        # A face back after a gap at the same place, or one that changed abruptly, may be someone
        # else: check it like a crossing.
        ambiguous |= {d for d, t in owners.items()
                      if t.last_seq != seq - 1 or face_changed(t.signature, signatures[d])}
        due = [d for d in range(len(boxes))
               if recognition_due(owners.get(d), face_size_px(boxes[d]), frontal_score(kps[d]),
                                  float(boxes[d, 4]), seq, d in ambiguous, self.settings,
                                  self.max_interval)]
        embeddings = self.recognise(image, kps, due)
        for d in range(len(boxes)):
            rec = due.index(d) if d in due else None
            track = owners.get(d)
            if rec is not None:
                track = self.check_identity(track, embeddings[rec], set(owners.values()), time_s)
            if track is None:
                track = self.new_track(boxes[d], time_s, seq)
            track.signature = signatures[d]
            self.extend(track, seq, frame_idx, time_s, boxes[d], kps[d],
                        None if rec is None else embeddings[rec])
            track.last_look = None  # kept for a last look when the track ends
            if rec is None and face_size_px(boxes[d]) >= self.settings.MIN_FACE_SIZE:
                track.last_look, track.last_kps = self.look(image, kps, d), kps[d].copy()

    def count_faces(self, boxes: np.ndarray) -> None:
        """Count a frame's faces, and those too small to be recognised."""
        self.counts["faces"] += len(boxes)
        self.counts["small_faces"] += sum(face_size_px(b) < self.settings.MIN_FACE_SIZE for b in boxes)

    def recognise(self, image: np.ndarray, kps: np.ndarray, due: list) -> np.ndarray | None:
        """Return the embeddings [faces, dim] of the faces due for recognition."""
        if not due:
            return None
        return self.recognise_looks([self.look(image, kps, d) for d in due])

    def look(self, image: np.ndarray, kps: np.ndarray, d: int):
        """Return what the recognizer needs of face d: its aligned crop, or with frames on the
        models' device, where it is there (aligned when recognised)."""
        if self.frame_handle is not None:
            return DeviceLook(*self.frame_handle, kps[d].copy())
        return align_face(image, kps[d])

    def recognise_looks(self, looks: list) -> np.ndarray:
        """Return the L2-normalised embeddings [faces, dim] of looks (see look)."""
        context = self.context
        started = time.perf_counter()
        embeddings = embed_looks(context.models, looks, self.settings.REC_CHUNK_SIZE)
        context.clock.add("track.recognise", time.perf_counter() - started, len(looks))
        return embeddings

    def check_identity(self, track: Track | None, embedding: np.ndarray, taken: set,
                       time_s: float) -> Track | None:
        """Return the track this recognised face continues: its own unless the face changed
        (then a new one), or for a new face a track unseen in this frame with the same face."""
        if track is not None:
            if track.embedding is None or float(embedding @ track.embedding) >= _SPLIT_MAX_SIMILARITY:
                return track
            self.end_tracks([track])  # boxes crossed or swapped, or clearly someone else now
            return None
        unseen = [t for t in self.active if t not in taken and t.embedding is not None
                  and t.last_time_s < time_s]
        if unseen:
            best = max(unseen, key=lambda t: float(embedding @ t.embedding))
            if float(embedding @ best.embedding) >= _RELINK_MIN_SIMILARITY:
                return best
        return None

    def new_track(self, box: np.ndarray, time_s: float, seq: int) -> Track:
        """Start a track at this face."""
        track = Track(self.next_id, box[:4].copy(), time_s, seq)
        self.next_id += 1
        self.active.append(track)
        return track

    def extend(self, track: Track, seq: int, frame_idx: int, time_s: float, box: np.ndarray,
               kps: np.ndarray, embedding: np.ndarray | None) -> None:
        """Add this frame's face (and its look, if it was embedded) to the track."""
        if track.faces and seq > track.last_seq:
            track.motion = (box[:4] - track.box) / (seq - track.last_seq)
        track.box, track.last_time_s, track.last_seq = box[:4].copy(), time_s, seq
        track.faces.append((frame_idx, time_s, *(float(v) for v in box[:5])))
        if embedding is not None:
            track.looks.append((frame_idx, kps.copy(), face_size_px(box), embedding))
            track.embedding, track.last_rec_seq = embedding, seq
            track.best_size_px = max(track.best_size_px, face_size_px(box))
            track.best_frontal = max(track.best_frontal, frontal_score(kps))

    def last_recognition(self, track: Track) -> None:
        """Embed a track's last face when it was not embedded: its last frames are then
        bracketed by a real look like all the others (see naming.sighting_flags)."""
        if track.last_look is None or (track.looks and track.looks[-1][0] == track.faces[-1][0]):
            return
        embedding = self.recognise_looks([track.last_look])[0]
        frame_idx, _, x1, y1, x2, y2, _ = track.faces[-1]
        track.looks.append((frame_idx, track.last_kps, face_size_px((x1, y1, x2, y2)), embedding))
        track.last_look = None

    def end_tracks(self, tracks: list) -> None:
        """End these tracks: embed their last face if needed, and report each one."""
        for track in tracks:
            self.active.remove(track)
            self.last_recognition(track)
            self.counts["tracks"] += 1
            per_track = self.counts["looks_per_track"]
            per_track[len(track.looks)] = per_track.get(len(track.looks), 0) + 1
            self.emit(("track", self.info.idx, track_record(track)))

    def finish(self) -> None:
        """End every track at the end of the video, and let go of its last frame on the device."""
        self.end_tracks(list(self.active))
        self.frame_handle = None


def track_record(track: Track) -> dict:
    """Return what the parent stores of an ended track (index.py): its id, faces [n, 7] as
    (frame_idx, time_s, x1, y1, x2, y2, score), and its looks' frame_idx, kps [m, 10],
    face_size_px and embedding [m, dim] (float16, as the index keeps them)."""
    looks = track.looks
    return {"track": track.track_id, "faces": np.array(track.faces, np.float64).reshape(-1, 7),
            "looks": {"frame_idx": np.array([look[0] for look in looks], np.int64),
                      "kps": np.array([look[1] for look in looks], np.float32).reshape(-1, 10),
                      "face_size_px": np.array([look[2] for look in looks], np.float32),
                      "embedding": np.array([look[3] for look in looks], np.float16).reshape(len(looks), -1)
                      if looks else np.zeros((0, 0), np.float16)}}
