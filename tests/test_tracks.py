"""Tracks (findpeople/tracks.py): face tracks followed across frames, embedded a few times per
track, and recorded whole for the index; named at search time through the real path (index ->
search -> naming) from the embeddings alone."""
from __future__ import annotations

import main
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from findpeople.decode import VideoInfo
from findpeople.detect import face_size_px
from findpeople.index import faces_with_boxes, records_table, table_index
from findpeople.naming import MAX_SNAPSHOTS, name_video
from findpeople.ring import StageClock
from findpeople.search import video_track_looks
from findpeople.tracks import (
    Track, VideoTracker, _FRONTAL_GAIN_FOR_RECHECK, _GROWTH_FOR_RECHECK, _LINK_MIN_IOU,
    _SHOT_CUT_MAD, box_iou, frontal_score, is_shot_cut, link_detections, recognition_due, thumbnail)


THRESHOLD, MARGIN, MIN_HITS = 0.6, 0.05, 2  # the CUSTOM_THRESHOLD, MATCH_MARGIN, MIN_TRACK_HITS


MIN_FACE_PX, INTERVAL, MAX_GAP_S = 20, 5, 1.0  # MIN_FACE_SIZE, RECOGNITION_INTERVAL, TRACK_MAX_GAP


FPS = 25.0


HEIGHT, WIDTH = 240, 320


PEOPLE = ["Alice", "Bob"]


def make_settings(output_dir, *extra):
    """Return Settings with the issue's tracking values and OUTPUT_DIR in the test's folder."""
    return main.load_settings([
        "--output", str(output_dir), "--custom-threshold", str(THRESHOLD),
        "--match-margin", str(MARGIN), "--min-track-hits", str(MIN_HITS),
        "--min-face-size", str(MIN_FACE_PX), "--recognition-interval", str(INTERVAL),
        "--track-max-gap", str(MAX_GAP_S), *extra])


@pytest.fixture()
def settings(tmp_path):
    """Settings with the issue's tracking values."""
    return make_settings(tmp_path / "out")


# box_iou / link_detections --------------------------------------------------------------------
def boxes(*rows) -> np.ndarray:
    """Return an [N, 4] float array of x1,y1,x2,y2 boxes."""
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


@pytest.mark.parametrize("a, b, expected", [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),  # identical
    ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),  # disjoint
    ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching edges
    ((0, 0, 2, 2), (1, 0, 3, 2), 1 / 3),  # half overlap: 2 / (4 + 4 - 2)
    ((0, 0, 10, 10), (0, 0, 5, 5), 0.25),  # contained
], ids=["identical", "disjoint", "touching", "half", "contained"])
def test_box_iou_is_intersection_over_union(a, b, expected):
    """IoU: 1 for identical boxes, 0 for disjoint ones, intersection / union in between."""
    got = box_iou(boxes(a), boxes(b))
    assert got.shape == (1, 1) and float(got[0, 0]) == pytest.approx(expected), \
        f"IoU of {a} and {b}: {got}, expected {expected}"


def test_box_iou_of_no_boxes_is_an_empty_matrix():
    """No tracks or no detections: an empty [len(a), len(b)] matrix."""
    assert box_iou(boxes(), boxes((0, 0, 1, 1))).shape == (0, 1)
    assert box_iou(boxes((0, 0, 1, 1), (1, 1, 2, 2)), boxes()).shape == (2, 0)


@pytest.mark.parametrize("tracks, dets, links", [
    ([(0, 0, 10, 10)], [(1, 0, 11, 10)], {0: 0}),  # one close detection
    ([(0, 0, 10, 10)], [(20, 20, 30, 30)], {}),  # no overlap: a new face
    ([(0, 0, 10, 10), (2, 0, 12, 10)], [(2, 0, 12, 10)], {0: 1}),  # the better of two tracks
    ([(0, 0, 10, 10)], [(4, 0, 14, 10), (1, 0, 11, 10)], {1: 0}),  # the better of two detections
    ([(0, 0, 10, 10), (30, 0, 40, 10)], [(31, 0, 41, 10), (1, 0, 11, 10)], {0: 1, 1: 0}),  # order
    ([(0, 0, 10, 10)], [(6, 0, 16, 10)], {}),  # IoU 4/16 = 0.25 < 0.3: not linked
], ids=["one", "none", "best-track", "best-detection", "two-pairs", "below-min-iou"])
def test_greedy_linking_keeps_the_best_overlap(tracks, dets, links):
    """Each detection continues at most one track and each track at most one detection, best IoU first."""
    got, _ = link_detections(boxes(*tracks), boxes(*dets), _LINK_MIN_IOU)
    assert got == links, f"tracks {tracks}, detections {dets}: links {got}, expected {links}"


@pytest.mark.parametrize("tracks, dets, ambiguous", [
    ([(0, 0, 10, 10), (2, 0, 12, 10)], [(1, 0, 11, 10)], {0}),  # a detection over two tracks
    ([(0, 0, 10, 10)], [(1, 0, 11, 10), (-1, 0, 9, 10)], {0, 1}),  # a track over two detections
    ([(0, 0, 10, 10), (50, 0, 60, 10)], [(1, 0, 11, 10), (51, 0, 61, 10)], set()),  # apart
], ids=["det-over-two-tracks", "track-over-two-dets", "apart"])
def test_a_detection_overlapping_two_tracks_is_ambiguous(tracks, dets, ambiguous):
    """Faces crossing (one box over two of the other side) are reported ambiguous."""
    _, got = link_detections(boxes(*tracks), boxes(*dets), _LINK_MIN_IOU)
    assert got == ambiguous, f"tracks {tracks}, detections {dets}: ambiguous {got}, expected {ambiguous}"


def test_linking_with_no_tracks_links_nothing():
    """The first frame of a video: no tracks, so no links and nothing ambiguous."""
    assert link_detections(boxes(), boxes((0, 0, 10, 10)), 0.3) == ({}, set())


# face_size_px / frontal_score / is_shot_cut -----------------------------------------------------
@pytest.mark.parametrize("box, size", [
    ((0, 0, 30, 50), 30.0), ((0, 0, 50, 30), 30.0), ((10, 20, 40, 50), 30.0), ((0, 0, 19.5, 80), 19.5),
])
def test_face_size_is_the_shorter_box_side(box, size):
    """face_size_px is min(width, height) of the box, in px."""
    got = face_size_px(np.array(box, dtype=np.float32))
    assert got == pytest.approx(size), f"box {box}: size {got}, expected {size}"


def frontal_kps(x1=0.0, y1=0.0, size=100.0, nose_x=None) -> np.ndarray:
    """Return plausible 5-point keypoints in a square box; nose_x moves the nose (0..1 of the box)."""
    rel = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]])
    if nose_x is not None:
        rel[2, 0] = nose_x
    return (rel * size + [x1, y1]).astype(np.float32)


@pytest.mark.parametrize("nose_x, score", [
    (0.5, 1.0),  # centred between the eyes: frontal
    (0.3, 0.0),  # at the left eye: profile
    (0.7, 0.0),  # at the right eye
    (0.1, 0.0),  # beyond an eye: clamped to 0
    (0.4, 0.5),  # halfway
], ids=["frontal", "left-eye", "right-eye", "beyond", "halfway"])
def test_frontal_score_is_one_for_a_centred_nose_and_zero_at_an_eye(nose_x, score):
    """frontal_score: 1 when the nose is midway between the eyes, 0 at (or beyond) an eye."""
    got = frontal_score(frontal_kps(nose_x=nose_x))
    assert got == pytest.approx(score, abs=1e-6), f"nose at {nose_x}: score {got}, expected {score}"


def test_thumbnail_is_a_64x36_grey_float_image():
    """thumbnail gives the 64x36 grey float32 picture the shot-cut test compares."""
    thumb = thumbnail(np.full((HEIGHT, WIDTH, 3), 100, np.uint8))
    assert thumb.shape == (36, 64) and thumb.dtype == np.float32, f"{thumb.shape} {thumb.dtype}"
    assert np.allclose(thumb, 100), f"grey 100 became {thumb.min()}..{thumb.max()}"


@pytest.mark.parametrize("change, is_cut", [
    (_SHOT_CUT_MAD + 1, True), (_SHOT_CUT_MAD - 1, False), (0.0, False), (150.0, True),
    (-(_SHOT_CUT_MAD + 1), True),
], ids=["above", "below", "none", "large", "darker"])
def test_a_flat_grey_change_above_the_cut_level_is_a_shot_cut(change, is_cut):
    """is_shot_cut: the mean absolute thumbnail change must exceed _SHOT_CUT_MAD grey levels."""
    before = np.full((36, 64), 100.0, np.float32)
    got = is_shot_cut(before, before + np.float32(change))
    assert got == is_cut, f"change {change} (cut level {_SHOT_CUT_MAD}): {got}, expected {is_cut}"


def test_the_first_frame_is_never_a_shot_cut():
    """No previous thumbnail: no cut."""
    assert is_shot_cut(None, np.zeros((36, 64), np.float32)) is False


# recognition_due ------------------------------------------------------------------------------
def make_track(recognitions=1, last_rec_seq=0, best_size_px=40.0, best_frontal=0.5) -> Track:
    """Return a track with `recognitions` looks, the last at last_rec_seq, with this best look."""
    track = Track(0, np.array([0, 0, 40, 40], np.float32), 0.0, 0)
    track.looks = [(i, np.zeros((5, 2), np.float32), 40.0, np.eye(4, dtype=np.float32)[0])
                   for i in range(recognitions)]
    track.last_rec_seq, track.best_size_px, track.best_frontal = last_rec_seq, best_size_px, best_frontal
    return track


@pytest.mark.parametrize("track, size, frontal, seq, ambiguous, due", [
    (None, 40.0, 0.5, 0, False, True),  # a new track: yes
    (None, MIN_FACE_PX - 1, 1.0, 0, False, False),  # below MIN_FACE_SIZE: never
    (None, MIN_FACE_PX, 0.5, 0, False, True),  # exactly MIN_FACE_SIZE is recognised
    (make_track(), MIN_FACE_PX - 1, 1.0, 100, True, False),  # never, even ambiguous and late
    (make_track(), 40.0, 0.5, INTERVAL - 1, False, False),  # before the interval
    (make_track(), 40.0, 0.5, INTERVAL, False, True),  # RECOGNITION_INTERVAL after the first look
    (make_track(2), 40.0, 0.5, 2 * INTERVAL - 1, False, False),  # the interval doubles...
    (make_track(2), 40.0, 0.5, 2 * INTERVAL, False, True),
    (make_track(3), 40.0, 0.5, 4 * INTERVAL - 1, False, False),
    (make_track(3), 40.0, 0.5, 4 * INTERVAL, False, True),
    (make_track(4), 40.0, 0.5, 8 * INTERVAL - 1, False, False),
    (make_track(4), 40.0, 0.5, 8 * INTERVAL, False, True),
    (make_track(20), 40.0, 0.5, 8 * INTERVAL, False, True),  # ... up to 8x
    (make_track(), 40.0 * _GROWTH_FOR_RECHECK + 0.5, 0.5, 1, False, True),  # grown
    (make_track(), 40.0 * _GROWTH_FOR_RECHECK - 0.5, 0.5, 1, False, False),  # not grown enough
    (make_track(), 40.0, 0.5 + _FRONTAL_GAIN_FOR_RECHECK + 0.01, 1, False, True),  # turned
    (make_track(), 40.0, 0.5 + _FRONTAL_GAIN_FOR_RECHECK - 0.01, 1, False, False),
    (make_track(4), 40.0 * _GROWTH_FOR_RECHECK + 0.5, 0.5, 1, False, True),  # grown, late
    (make_track(), 40.0, 0.5, 1, True, True),  # ambiguous: yes
    (make_track(4), 40.0, 0.5, 1, True, True),  # ... even with a long interval due
    (None, 40.0, 0.5, 0, False, False),  # a doubtful new detection (score < 0.5) waits a frame
    (make_track(0), 40.0, 0.5, 1, False, True),  # ... and is recognised on its second frame
], ids=["new", "tiny-new", "at-min-size", "tiny-ambiguous", "before-interval", "interval",
        "2-before-2x", "2-at-2x", "3-before-4x", "3-at-4x", "4-before-8x",
        "4-at-8x", "20-at-8x", "grown", "grown-less", "frontal", "frontal-less", "grown-late",
        "ambiguous", "ambiguous-after-4", "doubtful-new", "doubtful-second-frame"])
def test_recognition_is_due_at_start_after_a_doubling_interval_on_a_better_look_or_when_ambiguous(
        request, settings, track, size, frontal, seq, ambiguous, due):
    """Recognise new, ambiguous, grown or turned faces, and RECOGNITION_INTERVAL frames after the
    last look, doubling with each recognition up to 8x; never a face below MIN_FACE_SIZE."""
    score = 0.4 if request.node.callspec.id.startswith("doubtful") else 0.9
    got = recognition_due(track, size, frontal, score, seq, ambiguous, settings)
    state = None if track is None else (len(track.looks), track.last_rec_seq,
                                         track.best_size_px, track.best_frontal)
    assert got == due, f"track (looks, last seq, size, frontal) {state}, size {size}, " \
                       f"frontal {frontal}, seq {seq}, ambiguous {ambiguous}: {got}, expected {due}"


# VideoTracker on synthetic sequences ----------------------------------------------------------
DIM = 8


AXES = np.eye(DIM, dtype=np.float32)


REFS, REF_OWNERS = AXES[:2], np.array([0, 1])  # the reference photos: Alice's e0, Bob's e1


OWN_SIMILARITY = 0.7  # cosine similarity of a person's face to their photo: distance 0.30


IDENTITIES = {  # name -> unit embedding; cosine distances to [Alice's photo, Bob's photo]
    "Alice": OWN_SIMILARITY * AXES[0] + np.sqrt(1 - OWN_SIMILARITY ** 2) * AXES[3],  # [0.30, 1.00]
    "Bob": OWN_SIMILARITY * AXES[1] + np.sqrt(1 - OWN_SIMILARITY ** 2) * AXES[4],  # [1.00, 0.30]
    "Stranger": AXES[2],  # [1.00, 1.00]: no one's
}


class ScriptedTracker(VideoTracker):
    """A VideoTracker whose recognizer answers with the embedding of the identity the test gave
    each detection."""

    def __init__(self, info, context, emit):
        super().__init__(info, context, emit)
        self.identities: list = []  # this frame's identity per detection
        self.recognised: list = []  # (seq, identity) of every face sent to the recognizer
        self.seq = -1

    def look(self, image, kps, d):
        """Return the scripted identity of detection d instead of its aligned crop."""
        return (self.seq, self.identities[d])

    def recognise_looks(self, looks):
        """Return the embeddings [looks, DIM] of the identities looked at."""
        self.recognised += list(looks)
        return np.stack([IDENTITIES[name] for _, name in looks]).astype(np.float32)


def make_tracker(settings):
    """Return (tracker, emitted messages) for one 320x240 video at 25 fps (the tracker knows no
    reference photo)."""
    info = VideoInfo(idx=0, path="clip.mp4", output_name="clip", width=WIDTH, height=HEIGHT,
                     fps=FPS, frame_count=100, duration_s=4.0, time_base=Fraction(1, 25),
                     origin_pts=0, video_start_offset_s=0.0, has_audio=False)
    context = SimpleNamespace(settings=settings, models=None, clock=StageClock())
    emitted = []
    return ScriptedTracker(info, context, emitted.append), emitted


def face_box(x1, y1, size=60.0) -> tuple:
    """Return an x1,y1,x2,y2 square box."""
    return (float(x1), float(y1), float(x1 + size), float(y1 + size))


def run_frames(tracker, frames) -> None:
    """Feed frames [(frame_idx, time_s, image or None, [(identity, box), ...])] then finish."""
    previous_image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    for seq, (frame_idx, time_s, image, faces) in enumerate(frames):
        image = previous_image if image is None else image
        previous_image = image
        det = np.array([[*box, 0.9] for _, box in faces], np.float32).reshape(-1, 5)
        kps = np.array([frontal_kps(b[0], b[1], min(b[2] - b[0], b[3] - b[1])) for _, b in faces],
                       np.float32).reshape(-1, 5, 2)
        tracker.identities, tracker.seq = [name for name, _ in faces], seq
        tracker.step(seq, frame_idx, time_s, image, det, kps, thumbnail(image))
    tracker.finish()


def track_records(emitted) -> list:
    """Return the track records the tracker emitted (every message must be one, of video 0)."""
    assert all(m[0] == "track" and m[1] == 0 for m in emitted), f"unexpected messages {emitted}"
    return [m[2] for m in emitted]


def summaries(tracker, emitted) -> list:
    """Return the named track summaries of the emitted records, as a run finds them: the index
    table (records_table) read back (table_index), every look matched with REFS
    (video_track_looks, every track with debug_rec), then the naming rules (name_video)."""
    settings = tracker.settings
    index = table_index(records_table(track_records(emitted), {"counts": {}}))
    looks = video_track_looks(index, Path("clip.parquet"), REFS, REF_OWNERS, len(PEOPLE),
                              settings.CUSTOM_THRESHOLD, settings.debug_rec)
    return name_video(faces_with_boxes(index.faces), looks, PEOPLE, settings)


def described(tracks) -> list:
    """Return a short view of track summaries for assert messages."""
    return [(t["track"], t["name"], t["hits"], t["recognitions"], [f[0] for f in t["frames"]])
            for t in tracks]


def moving_face(name, frame_indices, x0=40.0, y0=60.0, step_px=2.0, size=60.0) -> dict:
    """Return {frame_idx: (name, box)} of one face drifting right by step_px per frame."""
    return {f: (name, face_box(x0 + step_px * i, y0, size)) for i, f in enumerate(frame_indices)}


def script(frame_count, *faces, images=None) -> list:
    """Return run_frames input: at each frame the faces of the {frame_idx: (name, box)} maps."""
    return [(f, f / FPS, None if images is None else images(f), [face[f] for face in faces if f in face])
            for f in range(frame_count)]


def test_one_slowly_moving_face_is_one_named_track_recognised_only_a_few_times(settings):
    """30 frames of one face: one track named Alice over all 30 frames, recognised at its start and
    then at least RECOGNITION_INTERVAL frames apart: far fewer than 30 times."""
    tracker, emitted = make_tracker(settings)
    run_frames(tracker, script(30, moving_face("Alice", range(30))))
    tracks = summaries(tracker, emitted)
    assert len(tracks) == 1 and tracks[0]["name"] == "Alice", f"tracks {described(tracks)}"
    assert [f[0] for f in tracks[0]["frames"]] == list(range(30)), f"frames {described(tracks)}"
    seqs = [seq for seq, _ in tracker.recognised]
    gaps = np.diff(seqs).tolist()
    assert seqs[:1] == [0] and 2 <= len(seqs) <= 30 // INTERVAL and min(gaps) >= INTERVAL, \
        f"recognised at frames {seqs}; expected the start, then at least {INTERVAL} frames apart"
    assert tracks[0]["recognitions"] == len(seqs) and tracks[0]["hits"] == len(seqs), \
        f"summary says {tracks[0]['recognitions']} recognitions, {tracks[0]['hits']} hits; made {seqs}"


def test_every_frame_of_a_named_track_is_reported_with_distances_only_at_recognitions(settings):
    """A named track's summary lists each frame; the distance is given only where it was recognised."""
    tracker, emitted = make_tracker(settings)
    run_frames(tracker, script(12, moving_face("Alice", range(12))))
    (track,) = summaries(tracker, emitted)
    rec_frames = {f for f, _, _, _, d in track["frames"] if d is not None}
    assert rec_frames == {seq for seq, _ in tracker.recognised}, \
        f"distances at {sorted(rec_frames)}, recognised at {tracker.recognised}"
    own = 1 - OWN_SIMILARITY  # 0.30, as the float16 embedding stored in the index gives it
    assert all(d == pytest.approx(own, abs=1e-3) for *_, d in track["frames"] if d is not None), \
        track["frames"]
    assert track["best_distance"] == pytest.approx(own, abs=1e-3), f"best distance {track['best_distance']}"
    box0 = track["frames"][0][2]
    assert box0 == pytest.approx(list(face_box(40, 60))), f"first box {box0}"


def test_a_shot_cut_ends_every_track(settings):
    """A cut between frames 9 and 10 (the thumbnail changes strongly, the box stays): two tracks."""
    tracker, emitted = make_tracker(settings)
    dark, bright = (np.full((HEIGHT, WIDTH, 3), v, np.uint8) for v in (30, 200))
    still = {f: ("Alice", face_box(100, 80)) for f in range(20)}
    run_frames(tracker, script(20, still, images=lambda f: dark if f < 10 else bright))
    tracks = summaries(tracker, emitted)
    parts = sorted([f[0] for f in t["frames"]] for t in tracks)
    assert parts == [list(range(10)), list(range(10, 20))], f"tracks {described(tracks)}"
    assert all(t["name"] == "Alice" for t in tracks), f"tracks {described(tracks)}"


@pytest.mark.parametrize("gap_factor, track_count", [(0.5, 1), (1.5, 2)],
                         ids=["short-gap-relinks", "long-gap-splits"])
def test_a_face_returning_within_track_max_gap_continues_its_track(settings, gap_factor, track_count):
    """A face gone for less than TRACK_MAX_GAP and back elsewhere is relinked by its embedding (one
    track); gone for longer, it starts a new track."""
    tracker, emitted = make_tracker(settings)
    gone = round(gap_factor * MAX_GAP_S * FPS)  # frames without the face
    first = moving_face("Alice", range(10), x0=20)
    second = moving_face("Alice", range(10 + gone, 20 + gone), x0=220, y0=120)
    run_frames(tracker, script(20 + gone, first, second))
    tracks = summaries(tracker, emitted)
    assert len(tracks) == track_count, f"gap {gone} frames ({gone / FPS:.2f} s, max {MAX_GAP_S} s): " \
                                       f"tracks {described(tracks)}"
    assert sorted(f[0] for t in tracks for f in t["frames"]) == sorted([*first, *second]), \
        f"frames {described(tracks)}"
    assert all(t["name"] == "Alice" for t in tracks), f"tracks {described(tracks)}"


def crossing_faces(step_px: float) -> tuple:
    """Return (Alice's, Bob's) {frame_idx: (name, box)}: 60 px faces 10 px apart vertically moving
    towards each other by step_px per frame, overlapping, and passing (x1 from 4 to 256 and back)."""
    frame_count = int(252 // step_px) + 1
    alice = {f: ("Alice", face_box(4 + step_px * f, 80)) for f in range(frame_count)}
    bob = {f: ("Bob", face_box(256 - step_px * f, 90)) for f in range(frame_count)}
    return alice, bob


def wrongly_named_frames(tracks, truth) -> list:
    """Return (track, name, frame_idx, box) of frames of named tracks where that person is not."""
    return [(t["track"], t["name"], f, box) for t in tracks for f, _, box, _, _ in t["frames"]
            if t["name"] is not None and
            (f not in truth[t["name"]] or box != pytest.approx(list(truth[t["name"]][f][1])))]


@pytest.mark.parametrize("step_px", [8.0, 12.0, 36.0], ids=["slow", "swap-overlapping", "fast-swap"])
@pytest.mark.parametrize("order", ["alice-first", "bob-first"])
def test_crossing_faces_never_report_one_person_under_the_others_name(settings, order, step_px):
    """Two people crossing: every frame of a track named Alice is a frame where Alice's box is
    there (and likewise for Bob); both are named at both ends of the crossing. At 36 px per frame
    each face lands exactly on the other's previous box while overlapping its own by IoU 0.25."""
    tracker, emitted = make_tracker(settings)
    alice, bob = crossing_faces(step_px)
    frame_count = len(alice)
    run_frames(tracker, script(frame_count, *((alice, bob) if order == "alice-first" else (bob, alice))))
    tracks = summaries(tracker, emitted)
    truth = {"Alice": alice, "Bob": bob}
    wrong = wrongly_named_frames(tracks, truth)
    assert not wrong, f"frames reported under the wrong name (track, name, frame, box): {wrong}\n" \
                      f"tracks {described(tracks)}"
    for name in truth:
        named = {f for t in tracks if t["name"] == name for f, *_ in t["frames"]}
        assert {0, frame_count - 1} <= named, f"{name} reported at {sorted(named)}; expected both " \
                                              f"ends; tracks {described(tracks)}"


def test_a_different_face_in_the_place_of_a_face_just_gone_is_not_given_its_name(settings):
    """Bob leaves (3 frames, well within TRACK_MAX_GAP) and Alice appears on his box: the box
    overlap alone must not make Alice's frames Bob's sightings (a track seen again after a gap is
    continued by embedding, as when it returns elsewhere)."""
    tracker, emitted = make_tracker(settings)
    bob = {f: ("Bob", face_box(100, 80)) for f in range(20)}
    alice = {f: ("Alice", face_box(100, 80)) for f in range(23, 43)}
    run_frames(tracker, script(43, bob, alice))
    tracks = summaries(tracker, emitted)
    wrong = wrongly_named_frames(tracks, {"Alice": alice, "Bob": bob})
    assert not wrong, f"frames reported under the wrong name (track, name, frame, box): {wrong}\n" \
                      f"tracks {described(tracks)}; recognised {tracker.recognised}"
    named = {t["name"]: [f[0] for f in t["frames"]] for t in tracks}
    assert named.get("Bob") == list(range(20)), f"tracks {described(tracks)}"


@pytest.mark.parametrize("debug_rec", [False, True], ids=["quiet", "debug-rec"])
def test_a_face_below_min_face_size_is_tracked_but_never_recognised_or_named(tmp_path, debug_rec):
    """A 15 px face (MIN_FACE_SIZE 20): one track record over all its frames, no look; with
    nothing to match it is never named, nor summarised even with debug_rec."""
    extra = ["--debug-rec"] if debug_rec else []
    tracker, emitted = make_tracker(make_settings(tmp_path / "out", *extra))
    tiny = moving_face("Alice", range(20), size=MIN_FACE_PX - 5, step_px=1)
    run_frames(tracker, script(20, tiny))
    assert tracker.recognised == [], f"tiny face sent to the recognizer: {tracker.recognised}"
    records = track_records(emitted)
    assert [(r["faces"][:, 0].tolist(), len(r["looks"]["frame_idx"])) for r in records] == \
        [(list(range(20)), 0)], f"records (frames, looks) {[(r['faces'][:, 0], r['looks']) for r in records]}"
    tracks = summaries(tracker, emitted)
    assert tracks == [], f"tracks {described(tracks)}"


@pytest.mark.parametrize("debug_rec", [False, True], ids=["quiet", "debug-rec"])
def test_a_stranger_is_never_named_and_reported_only_with_debug_rec(tmp_path, debug_rec):
    """Distances all above CUSTOM_THRESHOLD: no name; the track is emitted only under debug_rec."""
    extra = ["--debug-rec"] if debug_rec else []
    tracker, emitted = make_tracker(make_settings(tmp_path / "out", *extra))
    run_frames(tracker, script(30, moving_face("Stranger", range(30))))
    tracks = summaries(tracker, emitted)
    assert len(tracker.recognised) >= 2, f"stranger recognised only {tracker.recognised}"
    if not debug_rec:
        assert tracks == [], f"stranger reported without debug_rec: {described(tracks)}"
        return
    assert len(tracks) == 1 and tracks[0]["name"] is None and tracks[0]["hits"] == 0, \
        f"tracks {described(tracks)}"
    assert tracks[0]["frames"] == [] and tracks[0]["snapshot_looks"] == [], \
        f"sightings or snapshots of an unnamed track {tracks[0]}"
    assert [row[0] for row in tracks[0]["debug_rec"]] == [seq for seq, _ in tracker.recognised], \
        f"debug_rec rows {tracks[0]['debug_rec']} for looks at {tracker.recognised}"
    assert all(row[2] == {"Alice": 1.0, "Bob": 1.0} for row in tracks[0]["debug_rec"]), \
        f"the stranger is orthogonal to both photos: {tracks[0]['debug_rec']}"


def test_a_face_seen_fewer_than_min_track_hits_times_is_not_named(settings):
    """A face seen in one frame can be recognised only once (MIN_TRACK_HITS 2): its record holds
    that one look, and it stays unnamed and is not reported."""
    tracker, emitted = make_tracker(settings)
    run_frames(tracker, script(1, moving_face("Bob", range(1))))
    assert len(tracker.recognised) == 1, f"recognised {tracker.recognised}"
    assert [r["looks"]["frame_idx"].tolist() for r in track_records(emitted)] == [[0]], emitted
    tracks = summaries(tracker, emitted)
    assert tracks == [], f"tracks {described(tracks)}"


def test_a_short_track_gets_a_last_look_at_its_end(settings):
    """A face seen for 3 frames is recognised at its start and once more at its last frame (the
    look that verifies its last frames); with two agreeing looks it is named."""
    tracker, emitted = make_tracker(settings)
    run_frames(tracker, script(3, moving_face("Bob", range(3))))
    assert tracker.recognised == [(0, "Bob"), (2, "Bob")], f"recognised {tracker.recognised}"
    tracks = summaries(tracker, emitted)
    assert [(t["name"], [f[0] for f in t["frames"]]) for t in tracks] == [("Bob", [0, 1, 2])], \
        described(tracks)


def test_snapshots_are_the_named_track_s_agreeing_looks(settings):
    """A named track's summary lists its looks as snapshots (frame, time, box, distance 0.30), in
    frame order, the last look included (frames are decoded again at search time); a stranger or
    a face recognised too few times is not named, so it has none."""
    tracker, emitted = make_tracker(settings)
    alice = moving_face("Alice", range(30), x0=10, y0=10)
    stranger = moving_face("Stranger", range(30), x0=10, y0=150)
    bob = moving_face("Bob", range(1), x0=200, y0=10)  # recognised once: not named
    run_frames(tracker, script(30, alice, stranger, bob))
    tracks = summaries(tracker, emitted)
    assert [t["name"] for t in tracks] == ["Alice"], described(tracks)
    got = [(f, t, box) for f, t, box, _ in tracks[0]["snapshot_looks"]]
    expected = [(seq, seq / FPS, pytest.approx(list(alice[seq][1]))) for seq, name in tracker.recognised
                if name == "Alice"]
    assert got == expected, f"snapshot looks {got}, expected Alice's looks {expected}"
    distances = [d for *_, d in tracks[0]["snapshot_looks"]]
    assert distances == pytest.approx([1 - OWN_SIMILARITY] * len(expected), abs=1e-3), distances


def test_a_long_named_track_keeps_at_most_max_snapshots_in_frame_order(settings):
    """400 frames of Alice are looked at more than MAX_SNAPSHOTS times: MAX_SNAPSHOTS snapshots,
    each at a look, in frame order."""
    tracker, emitted = make_tracker(settings)
    run_frames(tracker, script(400, moving_face("Alice", range(400), step_px=0.5)))
    (track,) = summaries(tracker, emitted)
    frames = [f for f, *_ in track["snapshot_looks"]]
    looked = [seq for seq, _ in tracker.recognised]
    assert len(looked) > MAX_SNAPSHOTS, f"only {len(looked)} looks: the test needs more"
    assert len(frames) == MAX_SNAPSHOTS and frames == sorted(frames) and set(frames) <= set(looked), \
        f"snapshot frames {frames}; looks at {looked}"


# Track records: what the index stores ---------------------------------------------------------
def record_of(records, face_map) -> dict:
    """Return the record whose first face is the first face of a {frame_idx: (name, box)} map."""
    first = face_map[min(face_map)][1]
    found = [r for r in records if r["faces"][0, 2:6].tolist() == pytest.approx(list(first))]
    assert len(found) == 1, f"{len(found)} records start at {first}"
    return found[0]


def test_the_tracker_emits_a_record_of_every_track_strangers_and_lookless_ones_too(settings):
    """Alice, a stranger, a face seen once and a face too small to embed: four records, each with
    all its faces [n, 7] (frame, time, box, score) and its looks, embeddings float16 [m, DIM]
    equal to the identity's; the tiny face's has no look. counts add them up."""
    tracker, emitted = make_tracker(settings)
    faces = {"Alice": moving_face("Alice", range(30), x0=10, y0=10),
             "Stranger": moving_face("Stranger", range(30), x0=10, y0=150),
             "Bob": moving_face("Bob", range(1), x0=200, y0=10),
             "tiny": moving_face("Alice", range(5, 25), x0=240, y0=180, size=MIN_FACE_PX - 5)}
    run_frames(tracker, script(30, *faces.values()))
    records = track_records(emitted)
    assert len(records) == 4, f"{len(records)} records"
    for name, face_map in faces.items():
        record = record_of(records, face_map)
        assert record["faces"].dtype == np.float64 and record["faces"].shape == (len(face_map), 7), \
            f"{name}: faces {record['faces'].dtype} {record['faces'].shape}"
        assert record["faces"][:, 0].tolist() == sorted(face_map), f"{name}: frames {record['faces'][:, 0]}"
        assert record["faces"][:, 1] == pytest.approx(np.array(sorted(face_map)) / FPS), name
        looks = record["looks"]
        look_count = len(looks["frame_idx"])
        assert looks["embedding"].dtype == np.float16 and looks["kps"].shape == (look_count, 10), \
            f"{name}: embeddings {looks['embedding'].dtype}, kps {looks['kps'].shape}"
        assert set(looks["frame_idx"].tolist()) <= set(face_map), f"{name}: looks off its faces"
        if name == "tiny":
            assert look_count == 0, f"tiny face embedded at {looks['frame_idx']}"
            continue
        identity = IDENTITIES[face_map[min(face_map)][0]]
        assert looks["embedding"].shape[1] == DIM and np.allclose(looks["embedding"], identity, atol=1e-3), \
            f"{name}: embeddings {looks['embedding']}"
    looks_per_track = {}
    for record in records:
        count = len(record["looks"]["frame_idx"])
        looks_per_track[count] = looks_per_track.get(count, 0) + 1
    assert tracker.counts == {"faces": sum(map(len, faces.values())), "small_faces": 20, "tracks": 4,
                              "looks_per_track": looks_per_track}, f"counts {tracker.counts}"


@pytest.mark.parametrize("name", ["Alice", "Stranger"])
@pytest.mark.parametrize("frame_count", [1, 2, 3, 7, 30, 61])
def test_every_track_gets_a_look_at_its_last_face(settings, name, frame_count):
    """Named or not, a track whose last face is at least MIN_FACE_SIZE has a look at that face,
    and never two looks at one face."""
    tracker, emitted = make_tracker(settings)
    run_frames(tracker, script(frame_count, moving_face(name, range(frame_count))))
    (record,) = track_records(emitted)
    looked = record["looks"]["frame_idx"].tolist()
    assert looked[-1:] == [frame_count - 1] and len(set(looked)) == len(looked), \
        f"{frame_count} frames of {name}: looks at {looked}"


def test_a_track_ending_below_min_face_size_gets_no_look_at_its_small_faces(settings):
    """A face shrinking from 40 to 10 px: every look is at a face of at least MIN_FACE_SIZE, so
    none at its last face."""
    tracker, emitted = make_tracker(settings)
    sizes = np.linspace(40, 10, 31)
    shrinking = {f: ("Alice", face_box(100, 60, size)) for f, size in enumerate(sizes)}
    run_frames(tracker, script(len(sizes), shrinking))
    (record,) = track_records(emitted)
    looked = record["looks"]["frame_idx"].tolist()
    assert looked and all(sizes[f] >= MIN_FACE_PX for f in looked), \
        f"looks at {looked}, face sizes there {[round(sizes[f], 1) for f in looked]}"
    assert record["looks"]["face_size_px"] == pytest.approx(sizes[looked]), record["looks"]["face_size_px"]


# A face that turns into someone else without a gap (issue 3: never a name on a stranger) -------
# Close to Alice's embedding (cosine 0.45: the tracker does not split) but at distance 0.685 from
# her photo (above the threshold), and below the 0.5 that lets a look vouch for her name.
IDENTITIES["Lookalike"] = 0.45 * IDENTITIES["Alice"] + np.sqrt(1 - 0.45 ** 2) * AXES[5]


def same_place(name, frame_indices) -> dict:
    """Return {frame_idx: (name, box)} of a face that stays on one box."""
    return {f: (name, face_box(100, 60)) for f in frame_indices}


@pytest.mark.parametrize("before, newcomer", [
    (20, "Stranger"), (80, "Stranger"), (30, "Lookalike"), (80, "Bob")])
def test_a_face_replaced_on_the_same_box_without_a_gap_never_lends_its_name(settings, before,
                                                                            newcomer):
    """Alice on one box for `before` frames, then someone else on the same box at once (an
    undetected cut): no frame from the switch on is reported as Alice."""
    tracker, emitted = make_tracker(settings)
    faces = {**same_place("Alice", range(before)), **same_place(newcomer, range(before, before + 120))}
    run_frames(tracker, script(before + 120, faces))
    tracks = summaries(tracker, emitted)
    alice = sorted(f[0] for t in tracks if t["name"] == "Alice" for f in t["frames"])
    assert alice and max(alice) < before, f"Alice reported after frame {before}: {described(tracks)}"
    assert len(alice) >= before // 2, f"Alice's own frames mostly lost: {described(tracks)}"
    if newcomer == "Bob":
        bob = sorted(f[0] for t in tracks if t["name"] == "Bob" for f in t["frames"])
        assert bob and min(bob) >= before, f"Bob reported before he came: {described(tracks)}"


def painted(*faces):
    """Return images(frame_idx): a black frame with each face's box filled with a pattern that is
    the same for one identity and differs between identities (what the face-change check sees)."""
    patterns = {}

    def images(frame_idx):
        image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        for face in faces:
            if frame_idx in face:
                name, box = face[frame_idx]
                if name not in patterns:
                    seed = sum(map(ord, name))
                    patterns[name] = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), np.uint8)
                x1, y1, x2, y2 = (int(v) for v in box)
                tile = np.kron(patterns[name], np.ones((8, 8, 1), np.uint8))
                image[y1:y2, x1:x2] = tile[:y2 - y1, :x2 - x1]
        return image
    return images


@pytest.mark.parametrize("scenario", ["stranger-then-nothing", "stranger-then-gap", "stranger-between"])
def test_a_stranger_on_a_named_face_s_box_is_never_given_the_name(settings, scenario):
    """Alice for 40 frames, then a stranger on the same box: (1) for 16 frames and then nobody,
    (2) for 10 frames, a 3-frame gap, and on; (3) for 10 frames, then Alice again. In none of them
    is a stranger's frame reported as Alice (the last look at a track's end, and the check of a
    face that changed abruptly, catch what box overlap cannot)."""
    tracker, emitted = make_tracker(settings)
    alice = same_place("Alice", range(40))
    if scenario == "stranger-then-nothing":
        stranger, frames = same_place("Stranger", range(40, 56)), 60
        later = {}
    elif scenario == "stranger-then-gap":
        stranger, frames = {**same_place("Stranger", range(40, 50)), **same_place("Stranger", range(53, 120))}, 120
        later = {}
    else:
        stranger, frames = same_place("Stranger", range(40, 50)), 120
        later = same_place("Alice", range(50, 120))
    faces = {**alice, **stranger, **later}
    run_frames(tracker, script(frames, faces, images=painted(faces)))
    tracks = summaries(tracker, emitted)
    alice_frames = {f[0] for t in tracks if t["name"] == "Alice" for f in t["frames"]}
    stranger_frames = set(stranger)
    assert not alice_frames & stranger_frames, \
        f"stranger frames named Alice: {sorted(alice_frames & stranger_frames)}; {described(tracks)}"
    assert len(alice_frames & set(alice)) >= 30, f"Alice's own frames lost: {described(tracks)}"




# Bob's face, but still similar enough to Alice's embedding (cosine 0.35) that the tracker does not
# split: at distance 0.37 from Bob's photo and 0.755 from Alice's.
IDENTITIES["Bobish"] = 0.35 * IDENTITIES["Alice"] + 0.9 * IDENTITIES["Bob"] + np.sqrt(
    1 - 0.35 ** 2 - 0.9 ** 2) * AXES[5]


def test_a_look_at_someone_else_on_an_unsplit_track_starts_a_separately_named_piece(settings):
    """Alice for 40 frames, then on the same box a face the tracker keeps on her track (its
    embedding is close enough) but that agrees with Bob: the search splits the track there, so
    Alice's frames end before frame 40 and Bob's piece of the same track starts at 40."""
    tracker, emitted = make_tracker(settings)
    faces = {**same_place("Alice", range(40)), **same_place("Bobish", range(40, 100))}
    run_frames(tracker, script(100, faces, images=painted(faces)))
    assert len(track_records(emitted)) == 1, f"the tracker split the track: {len(emitted)} records"
    tracks = summaries(tracker, emitted)
    frames = {t["name"]: [f[0] for f in t["frames"]] for t in tracks}
    assert [(t["track"], t["name"]) for t in tracks] == [(0, "Alice"), (0, "Bob")], described(tracks)
    assert frames["Alice"][0] == 0 and max(frames["Alice"]) < 40, f"Alice's frames {frames['Alice']}"
    assert frames["Bob"][0] == 40 and frames["Bob"][-1] == 99, f"Bob's frames {frames['Bob']}"
