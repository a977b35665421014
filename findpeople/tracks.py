"""Tracks and matching: link each video's faces into tracks, recognise them a few times, name them.

Runs in the worker processes, one `VideoTracker` per video, fed frames in decode order by the
worker's FrameSequencer. In: per frame, the detections and the frame itself. Out: ("track", ...)
messages to the parent with each named track's sightings, and annotated snapshots written to
OUTPUT_DIR/<video>/. Matching is by cosine DISTANCE (1 - similarity; CUSTOM_THRESHOLD, lower is
stricter): a track is named when MIN_TRACK_HITS recognitions agree and the best person beats the
second best by MATCH_MARGIN.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .settings import Settings
from .outputs import encode_snapshot, snapshot_path, write_bytes_atomic
from .decode import VideoInfo
from .detect import SURE_FACE_SCORE, align_face, face_size_px
from .device import DeviceLook, embed_looks


# Face tracks: why each value, in the comment.
_LINK_MIN_IOU = 0.3  # a detection continues a track when their boxes overlap at least this much
_TOUCH_IOU = 0.05  # boxes overlapping more than this touch (see link_detections)
_SPLIT_MAX_SIMILARITY = 0.3  # cosine: a track's new embedding below this is someone else: split
_RELINK_MIN_SIMILARITY = 0.5  # cosine: a new face this close to a recently unseen track continues it
_SAME_FACE_SIMILARITY = 0.5  # cosine: an unsure look this close to a sure one is the same face
_FACE_CHANGE_LIMIT = 0.55  # mean change of a face's normalised 16x16 grey patch from one frame to
# the next that makes it due for recognition: on the shared clips the same face changed by at most
# 0.52 in 99 % of frames, while a different face differed by at least 0.55 in 99 % of pairs
_SHOT_CUT_MAD = 20.0  # grey levels: mean change of a 64x36 thumbnail; the shared clips' cuts: 27-31
_GROWTH_FOR_RECHECK = 1.3  # re-recognise when a face is this much larger than at its best look
_FRONTAL_GAIN_FOR_RECHECK = 0.25  # ... or this much more frontal (0 = profile, 1 = frontal)
_MAX_PENDING_SNAPSHOTS = 8  # snapshots kept in memory per track until it is named
_MAX_UNVERIFIED_S = 1.0  # s: a named track is re-recognised at least this often


def person_distances(embeddings: np.ndarray, ref_embeddings: np.ndarray, ref_owners: np.ndarray,
                     person_count: int) -> np.ndarray:
    """Return cosine distances [faces, people]: 1 - similarity to each person's closest photo."""
    similarity = embeddings.astype(np.float64) @ ref_embeddings.astype(np.float64).T
    best = np.full((len(embeddings), person_count), -1.0)
    for person in range(person_count):
        best[:, person] = similarity[:, ref_owners == person].max(axis=1)
    return 1.0 - best


def agreeing_person(distances: np.ndarray, threshold: float, margin: float) -> int | None:
    """Return the person one recognition names: closest within threshold, beating the next by margin."""
    order = np.argsort(distances, kind="stable")
    best = float(distances[order[0]])
    second = float(distances[order[1]]) if len(order) > 1 else math.inf
    if best <= threshold and second - best >= margin:
        return int(order[0])
    return None


def evaluate_evidence(distances: np.ndarray, threshold: float, margin: float, min_hits: int) -> tuple:
    """Return (person index or None, best distance to them, hits) for a track's recognitions.

    distances is [recognitions, people]. A recognition agrees with a person when that person is
    within threshold and ahead of the second best by margin. The track is named when one person
    has at least min_hits agreeing recognitions and more than all other people together.
    """
    votes = [agreeing_person(row, threshold, margin) for row in distances]
    counts = {p: votes.count(p) for p in set(votes) if p is not None}
    if not counts:
        return None, math.inf, 0
    person = max(counts, key=lambda p: (counts[p], -float(distances[:, p].min())))
    hits = counts[person]
    if hits < min_hits or hits <= sum(counts.values()) - hits:
        return None, float(distances[:, person].min()), hits
    return person, float(distances[:, person].min()), hits


def vouching_recognitions(track, person: int, settings: Settings) -> list:
    """Return, per recognition of a track named `person`, whether it vouches for the name.

    A recognition vouches when it agrees with the person, or when it agrees with nobody (a poor
    look: profile, blur) but its embedding is as close to one of the agreeing recognitions as
    the same face's embeddings are (cosine >= _SAME_FACE_SIMILARITY; different people stay
    below 0.3 with the shared models). A look at somebody else never vouches.
    """
    votes = [agreeing_person(row, settings.CUSTOM_THRESHOLD, settings.MATCH_MARGIN)
             for row in track.rec_distances]
    agreeing = np.array([e for e, v in zip(track.rec_embeddings, votes) if v == person])
    vouches = []
    for embedding, vote in zip(track.rec_embeddings, votes):
        same_face = len(agreeing) and float((agreeing @ embedding).max()) >= _SAME_FACE_SIMILARITY
        vouches.append(vote == person or (vote is None and bool(same_face)))
    return vouches


def sighting_flags(rec_at: list, confirms: list, tail: int) -> list:
    """Return, per frame of a named track, whether it counts as a sighting of that person.

    rec_at holds, per frame, the index of the recognition made there (or None); confirms says
    per recognition whether it vouches for the track's name. A frame counts when the
    recognitions on both sides of it confirm (one at the frame itself suffices), or, before the
    first and after the last recognition, when that one confirms and the frame is at most
    `tail` frames away. So a face that turns into someone else between two recognitions (same
    place, no gap) is never named beyond the last recognition that really saw the person.
    """
    count = len(rec_at)
    previous, following = [None] * count, [None] * count  # nearest recognition position each side
    last = None
    for i, rec in enumerate(rec_at):
        last = i if rec is not None else last
        previous[i] = last
    last = None
    for i in range(count - 1, -1, -1):
        last = i if rec_at[i] is not None else last
        following[i] = last
    flags = []
    for i in range(count):
        before, after = previous[i], following[i]
        ok_before = before is not None and bool(confirms[rec_at[before]])
        ok_after = after is not None and bool(confirms[rec_at[after]])
        if before is not None and after is not None:
            flags.append(ok_before and ok_after)  # at a recognition itself both sides are it
        elif before is not None:
            flags.append(ok_before and i - before <= tail)
        else:
            flags.append(ok_after and after - i <= tail)
    return flags


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
    frames: list = field(default_factory=list)  # [frame_idx, time_s, bbox, det_score, rec index]
    rec_distances: list = field(default_factory=list)  # one [people] row per recognition
    rec_frames: list = field(default_factory=list)  # (frame_idx, time_s) per recognition
    rec_embeddings: list = field(default_factory=list)  # one embedding per recognition
    embedding: np.ndarray | None = None  # of the latest recognition
    last_rec_seq: int = -(10 ** 9)
    best_size_px: float = 0.0
    best_frontal: float = 0.0
    name_idx: int | None = None  # named from the evidence so far
    agreed: bool = False  # some recognition agreed with somebody: the track may be named
    signature: np.ndarray | None = None  # the face's grey patch in its last frame (face_signature)
    last_look: object = None  # its aligned crop in its last frame, while it may be named
    pending: list = field(default_factory=list)  # (person, distance, path, jpeg) until named
    written: list = field(default_factory=list)  # (person, path) snapshots on disk


def recognition_interval(track: Track, settings: Settings, max_interval: int | None = None) -> int:
    """Return the processed frames until a track's next scheduled recognition.

    The interval doubles with each recognition, up to 8x: a face seen several times (named, or
    clearly a stranger) needs little re-checking unless it grows or turns to the camera. It is
    capped at max_interval (about a second of video: see VideoTracker), the longest stretch a
    named track's frames may go unverified.
    """
    interval = settings.RECOGNITION_INTERVAL * 2 ** min(max(len(track.rec_distances) - 1, 0), 3)
    return interval if max_interval is None else min(interval, max_interval)


def recognition_due(track: Track | None, size_px: float, frontal: float, det_score: float,
                    seq: int, ambiguous: bool, settings: Settings,
                    max_interval: int | None = None) -> bool:
    """Return True when this face of this track should go through the recognizer now."""
    if size_px < settings.MIN_FACE_SIZE:
        return False
    if track is None:  # a doubtful new detection waits one frame: many never come back
        return det_score >= SURE_FACE_SCORE
    if ambiguous or not track.rec_distances:
        return True
    return (seq - track.last_rec_seq >= recognition_interval(track, settings, max_interval)
            or size_px >= track.best_size_px * _GROWTH_FOR_RECHECK
            or frontal >= track.best_frontal + _FRONTAL_GAIN_FOR_RECHECK)


class VideoTracker:
    """Follows the faces of one video frame by frame (in order) and names each track.

    It decides which faces go to the recognizer, writes snapshots of recognised faces, and calls
    emit(("track", video_idx, summary)) when a track ends. Not thread-safe: FrameSequencer
    serialises the calls.
    """

    def __init__(self, info: VideoInfo, context, emit):
        self.info, self.context, self.emit = info, context, emit
        self.settings = context.settings
        # Recognise a track at least about once a second of video (see recognition_interval).
        per_second = info.fps / self.settings.FRAME_INTERVAL if info.fps > 0 else 1.0
        self.max_interval = max(self.settings.RECOGNITION_INTERVAL,
                                int(round(per_second * _MAX_UNVERIFIED_S)))
        self.active: list = []
        # faces seen, those below MIN_FACE_SIZE, tracks ended, those recognised fewer than
        # MIN_TRACK_HITS times: why a video found nobody (see nobody_found_hint)
        self.counts = {"faces": 0, "small_faces": 0, "tracks": 0, "short_tracks": 0}
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
        embeddings, distances = self.recognise(image, kps, due)
        for d in range(len(boxes)):
            rec = due.index(d) if d in due else None
            track = owners.get(d)
            if rec is not None:
                track = self.check_identity(track, embeddings[rec], distances[rec],
                                            set(owners.values()), time_s, seq)
            if track is None:
                track = self.new_track(boxes[d], time_s, seq)
            track.signature = signatures[d]
            self.extend(track, seq, frame_idx, time_s, image, boxes[d], kps[d],
                        None if rec is None else (embeddings[rec], distances[rec]))
            track.last_look = None  # kept for a last recognition when the track ends
            if rec is None and face_size_px(boxes[d]) >= self.settings.MIN_FACE_SIZE \
                    and track.agreed:
                track.last_look = self.look(image, kps, d)

    def count_faces(self, boxes: np.ndarray) -> None:
        """Count a frame's faces, and those too small to be recognised."""
        self.counts["faces"] += len(boxes)
        self.counts["small_faces"] += sum(face_size_px(b) < self.settings.MIN_FACE_SIZE for b in boxes)

    def recognise(self, image: np.ndarray, kps: np.ndarray, due: list) -> tuple:
        """Return (embeddings, distances [faces, people]) of the faces due for recognition."""
        if not due:
            return None, None
        return self.recognise_looks([self.look(image, kps, d) for d in due])

    def look(self, image: np.ndarray, kps: np.ndarray, d: int):
        """Return what the recognizer needs of face d: its aligned crop, or with frames on the
        models' device, where it is there (aligned when recognised)."""
        if self.frame_handle is not None:
            return DeviceLook(*self.frame_handle, kps[d].copy())
        return align_face(image, kps[d])

    def recognise_looks(self, looks: list) -> tuple:
        """Return (embeddings, distances [faces, people]) of looks (see look)."""
        context = self.context
        started = time.perf_counter()
        embeddings = embed_looks(context.models, looks, self.settings.REC_CHUNK_SIZE)
        context.clock.add("track.recognise", time.perf_counter() - started, len(looks))
        return embeddings, person_distances(embeddings, context.ref_embeddings,
                                            context.ref_owners, len(context.people))

    def check_identity(self, track: Track | None, embedding: np.ndarray, distances: np.ndarray,
                       taken: set, time_s: float, seq: int) -> Track | None:
        """Return the track this recognised face continues: its own unless the face changed
        (then a new one), or for a new face a track unseen in this frame with the same face."""
        if track is not None:
            settings = self.settings
            now = agreeing_person(distances, settings.CUSTOM_THRESHOLD, settings.MATCH_MARGIN)
            renamed = track.name_idx is not None and now is not None and now != track.name_idx
            changed = track.embedding is not None and float(embedding @ track.embedding) < _SPLIT_MAX_SIMILARITY
            if not (renamed or changed):
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

    def extend(self, track: Track, seq: int, frame_idx: int, time_s: float, image: np.ndarray,
               box: np.ndarray, kps: np.ndarray, recognition) -> None:
        """Add this frame's face (and its recognition, if any) to the track."""
        if track.frames and seq > track.last_seq:
            track.motion = (box[:4] - track.box) / (seq - track.last_seq)
        track.box, track.last_time_s, track.last_seq = box[:4].copy(), time_s, seq
        rec_index = None
        if recognition is not None:
            embedding, distances = recognition
            rec_index = len(track.rec_distances)
            track.rec_distances.append(distances)
            track.rec_frames.append((frame_idx, time_s))
            track.rec_embeddings.append(embedding)
            track.embedding, track.last_rec_seq = embedding, seq
            track.best_size_px = max(track.best_size_px, face_size_px(box))
            track.best_frontal = max(track.best_frontal, frontal_score(kps))
        track.frames.append([frame_idx, time_s, [round(float(v), 1) for v in box[:4]],
                             round(float(box[4]), 4), rec_index])
        if recognition is not None:
            self.after_recognition(track, frame_idx, time_s, image, box, distances)


    def after_recognition(self, track: Track, frame_idx: int, time_s: float, image: np.ndarray,
                          box: np.ndarray, distances: np.ndarray) -> None:
        """Name the track once the evidence allows; keep or write a snapshot of this face."""
        settings = self.settings
        person = agreeing_person(distances, settings.CUSTOM_THRESHOLD, settings.MATCH_MARGIN)
        if track.name_idx is None:
            track.name_idx = evaluate_evidence(np.array(track.rec_distances), settings.CUSTOM_THRESHOLD,
                                               settings.MATCH_MARGIN, settings.MIN_TRACK_HITS)[0]
        if person is None:
            return
        track.agreed = True
        path = snapshot_path(Path(settings.OUTPUT_DIR), self.info, frame_idx, time_s,
                             self.context.people[person])
        started = time.perf_counter()
        jpeg = encode_snapshot(image, box, self.context.people[person], float(distances[person]),
                               person, settings)
        self.context.clock.add("track.snapshot", time.perf_counter() - started)
        track.pending.append((person, float(distances[person]), path, jpeg))
        track.pending.sort(key=lambda item: item[1])
        del track.pending[_MAX_PENDING_SNAPSHOTS:]
        if track.name_idx is not None:
            self.write_snapshots(track, track.name_idx)

    def write_snapshots(self, track: Track, person: int) -> None:
        """Write the track's kept snapshots of this person (the others stay kept, in case later
        evidence names the track differently)."""
        for who, _, path, jpeg in track.pending:
            if who == person:  # not flushed: a disk flush per face would stall the tracker, and a
                write_bytes_atomic(path, jpeg, flush=False)  # lost one shows in video.json's sizes
                track.written.append((who, path))
        track.pending = [item for item in track.pending if item[0] != person]

    def last_recognition(self, track: Track) -> None:
        """Recognise a track that may be named once more, on its last frame, if that frame was not
        recognised: its last frames are then bracketed by a real look like all the others."""
        if track.last_look is None or track.frames[-1][4] is not None:
            return
        embeddings, distances = self.recognise_looks([track.last_look])
        track.frames[-1][4] = len(track.rec_distances)
        track.rec_distances.append(distances[0])
        track.rec_embeddings.append(embeddings[0])
        track.rec_frames.append((track.frames[-1][0], track.frames[-1][1]))
        track.last_look = None

    def end_tracks(self, tracks: list) -> None:
        """End these tracks: decide each name from all its evidence and report it."""
        settings = self.settings
        for track in tracks:
            self.active.remove(track)
            self.last_recognition(track)
            self.counts["tracks"] += 1
            self.counts["short_tracks"] += len(track.rec_distances) < settings.MIN_TRACK_HITS
            person, best, hits = (None, math.inf, 0) if not track.rec_distances else evaluate_evidence(
                np.array(track.rec_distances), settings.CUSTOM_THRESHOLD, settings.MATCH_MARGIN,
                settings.MIN_TRACK_HITS)
            for who, path in track.written:
                if who != person:  # later evidence overruled the early name
                    path.unlink(missing_ok=True)
            if person is not None:
                self.write_snapshots(track, person)
            if person is not None or settings.debug_rec:
                self.emit(("track", self.info.idx, self.summary(track, person, best, hits)))

    def summary(self, track: Track, person: int | None, best: float, hits: int) -> dict:
        """Return what the parent needs of an ended track: for a named one, the frames that
        count as sightings (see sighting_flags)."""
        people, settings = self.context.people, self.settings
        frames = [[f, t, box, score, None] for f, t, box, score, _ in track.frames]  # unnamed
        if person is not None:
            confirms = vouching_recognitions(track, person, settings)
            # Only a doubtful first frame (recognised one frame later) precedes the first look,
            # and every track that may be named gets a look at its last frame (last_recognition).
            flags = sighting_flags([f[4] for f in track.frames], confirms, 1)
            frames = [[f, t, box, score, None if rec is None
                       else round(float(track.rec_distances[rec][person]), 4)]
                      for (f, t, box, score, rec), counted in zip(track.frames, flags) if counted]
        summary = {"track": track.track_id, "name": None if person is None else people[person],
                   "best_distance": round(best, 4), "hits": hits,
                   "recognitions": len(track.rec_distances), "frames": frames,
                   "snapshots": [path.name for who, path in track.written if who == person]}
        if self.settings.debug_rec:
            summary["debug_rec"] = [[f, t, {p: round(float(d), 4) for p, d in zip(people, row)}]
                                    for (f, t), row in zip(track.rec_frames, track.rec_distances)]
        return summary

    def finish(self) -> None:
        """End every track at the end of the video, and let go of its last frame on the device."""
        self.end_tracks(list(self.active))
        self.frame_handle = None
