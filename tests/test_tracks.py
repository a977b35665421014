"""Tracks and matching (findpeople/tracks.py): cosine DISTANCE to a person's closest photo, face
tracks followed across frames, recognised a few times per track, and named only from agreeing
evidence."""
from __future__ import annotations

import main
import re
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest

from findpeople.decode import VideoInfo
from findpeople.detect import face_size_px
from findpeople.ring import StageClock
from findpeople.tracks import (
    Track, VideoTracker, _FRONTAL_GAIN_FOR_RECHECK, _GROWTH_FOR_RECHECK, _LINK_MIN_IOU,
    _SHOT_CUT_MAD, agreeing_person, box_iou, evaluate_evidence, frontal_score, is_shot_cut,
    link_detections, person_distances, recognition_due, sighting_flags, thumbnail)


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


# Naming rules: agreeing_person / evaluate_evidence --------------------------------------------
@pytest.mark.parametrize("row, threshold, margin, expected", [
    ([0.3, 0.9], 0.6, 0.05, 0),  # close and far ahead
    ([0.9, 0.3], 0.6, 0.05, 1),
    ([0.5, 0.9], 0.5, 0.05, 0),  # exactly at the threshold counts
    ([0.61, 0.9], 0.6, 0.05, None),  # above the threshold
    ([0.3, 0.33], 0.6, 0.05, None),  # second best too close
    ([0.25, 0.5], 0.6, 0.25, 0),  # ahead by exactly the margin counts (values exact in binary)
    ([0.3, 0.3], 0.6, 0.05, None),  # a tie: no one is ahead
    ([0.3], 0.6, 0.05, 0),  # one person: no second best to beat
    ([0.9, 0.2, 0.5], 0.6, 0.05, 1),  # three people
], ids=["clear", "clear-second", "at-threshold", "above-threshold", "small-margin",
        "at-margin", "tie", "one-person", "three-people"])
def test_one_recognition_agrees_with_the_closest_person_within_threshold_and_margin(
        row, threshold, margin, expected):
    """A recognition names its closest person when within threshold and ahead of the next by margin."""
    got = agreeing_person(np.array(row), threshold, margin)
    assert got == expected, f"distances {row}, threshold {threshold}, margin {margin}: {got}, " \
                            f"expected {expected}"


@pytest.mark.parametrize("rows, min_hits, person, hits", [
    ([[0.3, 0.9], [0.4, 0.9]], 2, 0, 2),  # two agreeing recognitions: named
    ([[0.3, 0.9], [0.4, 0.9], [0.35, 0.9]], 3, 0, 3),
    ([[0.3, 0.9]], 2, None, 1),  # too few hits
    ([[0.3, 0.9], [0.4, 0.9]], 3, None, 2),
    ([[0.3, 0.9]], 1, 0, 1),  # MIN_TRACK_HITS 1: one recognition is enough
    ([[0.3, 0.33], [0.3, 0.32]], 2, None, 0),  # margin to the second best below MATCH_MARGIN
    ([[0.61, 0.9], [0.65, 0.9]], 2, None, 0),  # best distance above the threshold
    ([[0.9, 0.9], [0.9, 0.9]], 1, None, 0),  # a stranger
], ids=["named", "named-3", "too-few", "too-few-3", "one-hit-enough", "small-margin",
        "above-threshold", "stranger"])
def test_a_track_is_named_only_with_min_track_hits_agreeing_recognitions(rows, min_hits, person, hits):
    """Named when at least MIN_TRACK_HITS recognitions agree (within threshold, margin ahead)."""
    got = evaluate_evidence(np.array(rows), THRESHOLD, MARGIN, min_hits)
    assert (got[0], got[2]) == (person, hits), \
        f"rows {rows}, min_hits {min_hits}: (person, best, hits) = {got}, expected {person}, {hits} hits"


def test_a_distance_exactly_at_the_threshold_counts_as_a_hit():
    """Distance == CUSTOM_THRESHOLD agrees (match when <= threshold); values exact in binary."""
    got = evaluate_evidence(np.array([[0.5, 1.0], [0.5, 1.0]]), 0.5, MARGIN, 2)
    assert got == (0, 0.5, 2), f"evaluate_evidence at the threshold: {got}, expected (0, 0.5, 2)"


@pytest.mark.parametrize("rows, min_hits", [
    ([[0.3, 0.9], [0.9, 0.3]], 1),  # one each
    ([[0.3, 0.9], [0.9, 0.3], [0.3, 0.9], [0.9, 0.3]], 2),  # two each
    ([[0.3, 0.9, 0.9], [0.3, 0.9, 0.9], [0.9, 0.3, 0.9], [0.9, 0.9, 0.3]], 2),  # 2 vs 1 + 1
], ids=["1-1", "2-2", "2-vs-1+1"])
def test_a_track_whose_recognitions_disagree_is_not_named(rows, min_hits):
    """No name when the leading person does not have more hits than all others together."""
    got = evaluate_evidence(np.array(rows), THRESHOLD, MARGIN, min_hits)
    assert got[0] is None, f"rows {rows}: named person {got[0]} ({got}); expected no name"


@pytest.mark.parametrize("rows, person, hits", [
    ([[0.3, 0.9], [0.3, 0.9], [0.3, 0.9], [0.9, 0.3]], 0, 3),  # 3 vs 1
    ([[0.9, 0.3], [0.9, 0.3], [0.3, 0.9]], 1, 2),  # 2 vs 1
    ([[0.9, 0.3], [0.3, 0.9], [0.9, 0.3], [0.9, 0.9]], 1, 2),  # a stranger look does not vote
], ids=["3-vs-1", "2-vs-1", "stranger-row"])
def test_the_majority_person_names_the_track_when_the_others_have_fewer_hits(rows, person, hits):
    """The person with more agreeing recognitions than all others together names the track."""
    got = evaluate_evidence(np.array(rows), THRESHOLD, MARGIN, MIN_HITS)
    assert (got[0], got[2]) == (person, hits), f"rows {rows}: {got}, expected person {person}, {hits} hits"


@pytest.mark.parametrize("rows, best", [
    ([[0.5, 0.9], [0.2, 0.9], [0.4, 0.9]], 0.2),
    ([[0.45, 0.9], [0.55, 0.95], [0.3, 0.8]], 0.3),
    ([[0.1, 0.9], [0.1, 0.9]], 0.1),
])
def test_the_best_distance_is_the_minimum_over_the_tracks_recognitions(rows, best):
    """The returned distance is the named person's smallest distance over all the recognitions."""
    got = evaluate_evidence(np.array(rows), THRESHOLD, MARGIN, MIN_HITS)
    assert got[0] == 0 and got[1] == pytest.approx(best), f"rows {rows}: {got}, expected (0, {best}, ...)"


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
def make_track(recognitions=1, last_rec_seq=0, best_size_px=40.0, best_frontal=0.5,
               name_idx=None) -> Track:
    """Return a track recognised `recognitions` times, last at last_rec_seq, with this best look."""
    track = Track(0, np.array([0, 0, 40, 40], np.float32), 0.0, 0)
    track.rec_distances = [np.array([0.3, 0.9])] * recognitions
    track.last_rec_seq, track.best_size_px, track.best_frontal = last_rec_seq, best_size_px, best_frontal
    track.name_idx = name_idx
    return track


@pytest.mark.parametrize("track, size, frontal, seq, ambiguous, due", [
    (None, 40.0, 0.5, 0, False, True),  # a new track: yes
    (None, MIN_FACE_PX - 1, 1.0, 0, False, False),  # below MIN_FACE_SIZE: never
    (None, MIN_FACE_PX, 0.5, 0, False, True),  # exactly MIN_FACE_SIZE is recognised
    (make_track(), MIN_FACE_PX - 1, 1.0, 100, True, False),  # never, even ambiguous and late
    (make_track(), 40.0, 0.5, INTERVAL - 1, False, False),  # before the interval
    (make_track(), 40.0, 0.5, INTERVAL, False, True),  # RECOGNITION_INTERVAL after the first look
    (make_track(name_idx=0), 40.0, 0.5, INTERVAL, False, True),
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
    (make_track(4, name_idx=0), 40.0, 0.5, 1, True, True),
    (None, 40.0, 0.5, 0, False, False),  # a doubtful new detection (score < 0.5) waits a frame
    (make_track(0), 40.0, 0.5, 1, False, True),  # ... and is recognised on its second frame
], ids=["new", "tiny-new", "at-min-size", "tiny-ambiguous", "before-interval", "interval",
        "named-interval", "2-before-2x", "2-at-2x", "3-before-4x", "3-at-4x", "4-before-8x",
        "4-at-8x", "20-at-8x", "grown", "grown-less", "frontal", "frontal-less", "grown-late",
        "ambiguous", "named-ambiguous", "doubtful-new", "doubtful-second-frame"])
def test_recognition_is_due_at_start_after_a_doubling_interval_on_a_better_look_or_when_ambiguous(
        request, settings, track, size, frontal, seq, ambiguous, due):
    """Recognise new, ambiguous, grown or turned faces, and RECOGNITION_INTERVAL frames after the
    last look, doubling with each recognition up to 8x; never a face below MIN_FACE_SIZE."""
    score = 0.4 if request.node.callspec.id.startswith("doubtful") else 0.9
    got = recognition_due(track, size, frontal, score, seq, ambiguous, settings)
    state = None if track is None else (len(track.rec_distances), track.last_rec_seq,
                                         track.best_size_px, track.best_frontal, track.name_idx)
    assert got == due, f"track (recognitions, last seq, size, frontal, name) {state}, size {size}, " \
                       f"frontal {frontal}, seq {seq}, ambiguous {ambiguous}: {got}, expected {due}"


# VideoTracker on synthetic sequences ----------------------------------------------------------
DIM = 8


IDENTITIES = {  # name -> (unit embedding, distances to [Alice, Bob])
    "Alice": (np.eye(DIM, dtype=np.float32)[0], np.array([0.30, 0.90])),
    "Bob": (np.eye(DIM, dtype=np.float32)[1], np.array([0.90, 0.30])),
    "Stranger": (np.eye(DIM, dtype=np.float32)[2], np.array([0.85, 0.90])),
}


class ScriptedTracker(VideoTracker):
    """A VideoTracker whose recognizer answers from the identity the test gave each detection."""

    def __init__(self, info, context, emit):
        super().__init__(info, context, emit)
        self.identities: list = []  # this frame's identity per detection
        self.recognised: list = []  # (seq, identity) of every face sent to the recognizer
        self.seq = -1

    def look(self, image, kps, d):
        """Return the scripted identity of detection d instead of its aligned crop."""
        return (self.seq, self.identities[d])

    def recognise_looks(self, looks):
        """Return the scripted (embeddings, distances) of the identities looked at."""
        self.recognised += list(looks)
        names = [name for _, name in looks]
        return (np.stack([IDENTITIES[n][0] for n in names]),
                np.stack([IDENTITIES[n][1] for n in names]))


def make_tracker(settings):
    """Return (tracker, emitted messages) for one 320x240 video at 25 fps."""
    info = VideoInfo(idx=0, path="clip.mp4", output_name="clip", width=WIDTH, height=HEIGHT,
                          fps=FPS, frame_count=100, duration_s=4.0, time_base=Fraction(1, 25),
                          origin_pts=0, video_start_offset_s=0.0, has_audio=False)
    refs = np.stack([IDENTITIES["Alice"][0], IDENTITIES["Bob"][0]])
    context = SimpleNamespace(settings=settings, people=list(PEOPLE), ref_embeddings=refs,
                              ref_owners=np.array([0, 1]), models=None, clock=StageClock())
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


def summaries(emitted) -> list:
    """Return the track summaries among the emitted messages."""
    assert all(m[0] == "track" and m[1] == 0 for m in emitted), f"unexpected messages {emitted}"
    return [m[2] for m in emitted]


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
    tracks = summaries(emitted)
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
    (track,) = summaries(emitted)
    rec_frames = {f for f, _, _, _, d in track["frames"] if d is not None}
    assert rec_frames == {seq for seq, _ in tracker.recognised}, \
        f"distances at {sorted(rec_frames)}, recognised at {tracker.recognised}"
    assert all(d == pytest.approx(0.30) for *_, d in track["frames"] if d is not None), track["frames"]
    assert track["best_distance"] == pytest.approx(0.30), f"best distance {track['best_distance']}"
    box0 = track["frames"][0][2]
    assert box0 == pytest.approx(list(face_box(40, 60))), f"first box {box0}"


def test_a_shot_cut_ends_every_track(settings):
    """A cut between frames 9 and 10 (the thumbnail changes strongly, the box stays): two tracks."""
    tracker, emitted = make_tracker(settings)
    dark, bright = (np.full((HEIGHT, WIDTH, 3), v, np.uint8) for v in (30, 200))
    still = {f: ("Alice", face_box(100, 80)) for f in range(20)}
    run_frames(tracker, script(20, still, images=lambda f: dark if f < 10 else bright))
    tracks = summaries(emitted)
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
    tracks = summaries(emitted)
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
    tracks = summaries(emitted)
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
    tracks = summaries(emitted)
    wrong = wrongly_named_frames(tracks, {"Alice": alice, "Bob": bob})
    assert not wrong, f"frames reported under the wrong name (track, name, frame, box): {wrong}\n" \
                      f"tracks {described(tracks)}; recognised {tracker.recognised}"
    named = {t["name"]: [f[0] for f in t["frames"]] for t in tracks}
    assert named.get("Bob") == list(range(20)), f"tracks {described(tracks)}"


def test_a_face_below_min_face_size_is_tracked_but_never_recognised_or_named(tmp_path):
    """A 15 px face (MIN_FACE_SIZE 20): one track over all its frames, no recognition, no name."""
    tracker, emitted = make_tracker(make_settings(tmp_path / "out", "--debug-rec"))
    tiny = moving_face("Alice", range(20), size=MIN_FACE_PX - 5, step_px=1)
    run_frames(tracker, script(20, tiny))
    tracks = summaries(emitted)
    assert tracker.recognised == [], f"tiny face sent to the recognizer: {tracker.recognised}"
    assert len(tracks) == 1 and tracks[0]["name"] is None and tracks[0]["recognitions"] == 0, \
        f"tracks {described(tracks)}"
    assert [f[0] for f in tracks[0]["frames"]] == list(range(20)), f"tracks {described(tracks)}"


def test_a_tiny_face_is_not_named_without_debug_rec(settings):
    """Without debug_rec nothing is reported for a face too small to recognise."""
    tracker, emitted = make_tracker(settings)
    run_frames(tracker, script(20, moving_face("Alice", range(20), size=MIN_FACE_PX - 5, step_px=1)))
    assert emitted == [], f"emitted {emitted}"


@pytest.mark.parametrize("debug_rec", [False, True], ids=["quiet", "debug-rec"])
def test_a_stranger_is_never_named_and_reported_only_with_debug_rec(tmp_path, debug_rec):
    """Distances all above CUSTOM_THRESHOLD: no name; the track is emitted only under debug_rec."""
    extra = ["--debug-rec"] if debug_rec else []
    tracker, emitted = make_tracker(make_settings(tmp_path / "out", *extra))
    run_frames(tracker, script(30, moving_face("Stranger", range(30))))
    tracks = summaries(emitted)
    assert len(tracker.recognised) >= 2, f"stranger recognised only {tracker.recognised}"
    if not debug_rec:
        assert tracks == [], f"stranger reported without debug_rec: {described(tracks)}"
        return
    assert len(tracks) == 1 and tracks[0]["name"] is None and tracks[0]["hits"] == 0, \
        f"tracks {described(tracks)}"
    assert all(f[4] is None for f in tracks[0]["frames"]), f"distances of an unnamed track {tracks[0]}"
    assert len(tracks[0]["debug_rec"]) == tracks[0]["recognitions"], \
        f"debug_rec rows {tracks[0]['debug_rec']} for {tracks[0]['recognitions']} recognitions"


def test_a_face_seen_fewer_than_min_track_hits_times_is_not_named(settings):
    """A face seen in one frame can be recognised only once (MIN_TRACK_HITS 2): it stays unnamed
    and is not reported."""
    tracker, emitted = make_tracker(settings)
    run_frames(tracker, script(1, moving_face("Bob", range(1))))
    assert len(tracker.recognised) == 1, f"recognised {tracker.recognised}"
    assert emitted == [], f"emitted {emitted}"


def test_a_short_track_gets_a_last_look_at_its_end(settings):
    """A face seen for 3 frames is recognised at its start and once more at its last frame (the
    look that verifies its last frames); with two agreeing looks it is named."""
    tracker, emitted = make_tracker(settings)
    run_frames(tracker, script(3, moving_face("Bob", range(3))))
    assert tracker.recognised == [(0, "Bob"), (2, "Bob")], f"recognised {tracker.recognised}"
    assert [(t["name"], [f[0] for f in t["frames"]]) for t in summaries(emitted)] == [("Bob", [0, 1, 2])]


SNAPSHOT_NAME = re.compile(r"frame_(\d+)_(\d+\.\d+)s_(\w+)\.jpg")


def snapshot_files(output_dir) -> list:
    """Return (frame_idx, time_s, name) of the snapshots of the test video, checking their names."""
    folder = output_dir / "clip"
    files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    bad = [n for n in files if not SNAPSHOT_NAME.fullmatch(n)]
    assert not bad, f"files not named frame_<idx>_<time>s_<Name>.jpg: {bad}"
    return sorted((int(m[1]), float(m[2]), m[3]) for m in map(SNAPSHOT_NAME.fullmatch, files))


def test_snapshots_are_written_only_for_named_tracks_at_recognised_frames(tmp_path):
    """Snapshots go to OUTPUT_DIR/<output_name>/frame_<idx>_<time>s_<Name>.jpg, one per recognised
    frame of a named track; none for a stranger or a face recognised too few times."""
    output_dir = tmp_path / "out"
    tracker, emitted = make_tracker(make_settings(output_dir))
    alice = moving_face("Alice", range(30), x0=10, y0=10)
    stranger = moving_face("Stranger", range(30), x0=10, y0=150)
    bob = moving_face("Bob", range(1), x0=200, y0=10)  # recognised once: not named
    run_frames(tracker, script(30, alice, stranger, bob))
    got = snapshot_files(output_dir)
    # The last look at a track's end (frame 29) has no frame left to draw: no snapshot there.
    expected = sorted((seq, round(seq / FPS, 3), name) for seq, name in tracker.recognised
                      if name == "Alice" and seq < 29)
    assert got == expected, f"snapshots {got}, expected Alice's recognised frames {expected}; " \
                            f"recognised {tracker.recognised}"
    assert [t["name"] for t in summaries(emitted)] == ["Alice"], described(summaries(emitted))
    assert not list(output_dir.rglob("*.part")), f"left-over .part files {list(output_dir.rglob('*.part'))}"


def test_snapshot_jpegs_are_readable_frames(tmp_path):
    """Each snapshot is a JPEG of the whole frame."""
    import cv2
    output_dir = tmp_path / "out"
    tracker, _ = make_tracker(make_settings(output_dir))
    run_frames(tracker, script(10, moving_face("Alice", range(10))))
    files = sorted((output_dir / "clip").glob("*.jpg"))
    assert len(files) == 2, f"snapshots {files}"
    shapes = [cv2.imread(str(p)).shape for p in files]
    assert shapes == [(HEIGHT, WIDTH, 3)] * 2, f"snapshot shapes {shapes}"


# A face that turns into someone else without a gap (issue 3: never a name on a stranger) -------
IDENTITIES["Lookalike"] = (  # close to Alice's embedding (no split), but above the threshold
    (0.45 * IDENTITIES["Alice"][0] + np.sqrt(1 - 0.45 ** 2) * np.eye(DIM, dtype=np.float32)[3]),
    np.array([THRESHOLD + 0.05, 0.90]))


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
    tracks = summaries(emitted)
    alice = sorted(f[0] for t in tracks if t["name"] == "Alice" for f in t["frames"])
    assert alice and max(alice) < before, f"Alice reported after frame {before}: {described(tracks)}"
    assert len(alice) >= before // 2, f"Alice's own frames mostly lost: {described(tracks)}"
    if newcomer == "Bob":
        bob = sorted(f[0] for t in tracks if t["name"] == "Bob" for f in t["frames"])
        assert bob and min(bob) >= before, f"Bob reported before he came: {described(tracks)}"


@pytest.mark.parametrize("rec_at, confirms, tail, expected", [
    ([0, None, None, 1, None], [True, True], 5, [True] * 5),  # between and after confirmations
    ([0, None, None, 1, None], [True, False], 5, [True, False, False, False, False]),  # switched
    ([None, 0, None, None], [True], 1, [True, True, True, False]),  # tail of 1 frame each side
    ([0, None, 1, None, 2], [True, False, True], 5, [True, False, False, False, True]),
    ([None, None], [], 5, [False, False]),  # never recognised: never a sighting
])
def test_sightings_are_frames_bracketed_by_confirming_recognitions(rec_at, confirms, tail, expected):
    """A frame counts when the recognitions on both sides confirm the name, or within `tail`
    frames of a confirming first or last recognition."""
    assert sighting_flags(rec_at, confirms, tail) == expected


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
    tracks = summaries(emitted)
    alice_frames = {f[0] for t in tracks if t["name"] == "Alice" for f in t["frames"]}
    stranger_frames = set(stranger)
    assert not alice_frames & stranger_frames, \
        f"stranger frames named Alice: {sorted(alice_frames & stranger_frames)}; {described(tracks)}"
    assert len(alice_frames & set(alice)) >= 30, f"Alice's own frames lost: {described(tracks)}"


def unit(*values) -> np.ndarray:
    """Return the L2-normalised float32 vector of the values."""
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def random_units(rng, count: int, dim: int) -> np.ndarray:
    """Return count random L2-normalised float32 rows."""
    rows = rng.standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# person_distances ----------------------------------------------------------------------------
def test_person_distance_uses_the_closest_of_several_photos(main_module):
    """A face identical to a person's SECOND photo is at distance 0 from that person."""
    refs = np.stack([unit(1, 0, 0, 0), unit(0, 1, 0, 0), unit(0, 0, 1, 0)])
    owners = np.array([0, 0, 1])  # person 0 has photos 0 and 1, person 1 has photo 2
    faces = np.stack([unit(0, 1, 0, 0)])
    distances = person_distances(faces, refs, owners, 2)
    assert distances[0].tolist() == pytest.approx([0.0, 1.0], abs=1e-6), \
        f"distances {distances[0].tolist()}, expected [0, 1] (photo 1 of person 0 is identical)"


@pytest.mark.parametrize("face_count, photos_per_person, dim", [
    (1, [1], 4), (3, [2, 1, 3], 8), (5, [1, 1], 512), (2, [4], 16), (7, [1, 5, 2, 1], 32),
])
def test_person_distance_is_one_minus_the_best_cosine_similarity(main_module, face_count,
                                                                  photos_per_person, dim):
    """distances[f, p] = 1 - max over p's photos of cos(face f, photo), shaped [faces, people]."""
    rng = np.random.default_rng(face_count * 1000 + dim)
    refs = random_units(rng, sum(photos_per_person), dim)
    owners = np.repeat(np.arange(len(photos_per_person)), photos_per_person)
    faces = random_units(rng, face_count, dim)
    distances = person_distances(faces, refs, owners, len(photos_per_person))
    expected = np.array([[1 - max(float(face @ refs[k]) for k in np.nonzero(owners == p)[0])
                          for p in range(len(photos_per_person))] for face in faces])
    assert distances.shape == (face_count, len(photos_per_person)), f"shape {distances.shape}"
    assert np.allclose(distances, expected, atol=1e-5), \
        f"max difference {np.abs(distances - expected).max()}:\n{distances}\nexpected\n{expected}"


def test_person_distance_accepts_photos_in_any_owner_order(main_module):
    """Photos of one person need not be adjacent: owners [1, 0, 1] is read per photo."""
    refs = np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)])
    owners = np.array([1, 0, 1])
    faces = np.stack([unit(0, 0, 1), unit(0, 1, 0)])
    distances = person_distances(faces, refs, owners, 2)
    assert np.allclose(distances, [[1.0, 0.0], [0.0, 1.0]], atol=1e-6), f"distances\n{distances}"


@pytest.mark.parametrize("face, expected_distance", [
    ((1, 0, 0), 0.0),  # identical: similarity 1, distance 0
    ((0, 1, 0), 1.0),  # orthogonal: similarity 0, distance 1
    ((-1, 0, 0), 2.0),  # opposite: similarity -1, distance 2
    ((1, 1, 0), 1 - 2 ** -0.5),  # 45 degrees
], ids=["identical", "orthogonal", "opposite", "45deg"])
def test_distance_is_one_minus_similarity_never_the_similarity(main_module, face, expected_distance):
    """Distance and similarity are never swapped: identical faces are at distance 0, not 1."""
    distances = person_distances(np.stack([unit(*face)]), np.stack([unit(1, 0, 0)]),
                                             np.array([0]), 1)
    assert float(distances[0, 0]) == pytest.approx(expected_distance, abs=1e-6), \
        f"face {face}: distance {float(distances[0, 0])}, expected {expected_distance}"


# threshold semantics, through agreeing_person (the rule the tracker uses) ----------------------
def match(main_module, distances, threshold):
    """Return (closest person, matched?, distance) as the tracker decides it, margin 0."""
    distances = np.asarray(distances, dtype=np.float64)
    person = agreeing_person(distances, threshold, 0.0)
    best = int(np.argmin(distances))
    return best, person == best, float(distances[best])


@pytest.mark.parametrize("distances, threshold, best, matched", [
    ([0.8, 0.6], 0.6, 1, True),  # exactly at the threshold: a match
    ([0.8, 0.6000001], 0.6, 1, False),  # just above: no match
    ([0.5999999], 0.6, 0, True),  # just below: a match
    ([0.5], 0.6, 0, True),
    ([0.5], 0.4, 0, False),  # lower threshold is stricter
    ([0.0], 0.0, 0, True),  # threshold 0: only identical faces
    ([2.0], 2.0, 0, True),  # threshold 2: everything
    ([0.3, 0.2, 0.9], 0.25, 1, True),  # the closest person is the smallest distance
    ([0.3, 0.2, 0.9], 0.1, 1, False),
    ([0.74, 0.70], 0.70, 1, True),  # conftest's TEST_THRESHOLD
])
def test_a_face_matches_when_its_distance_is_at_most_the_threshold(main_module, distances,
                                                                   threshold, best, matched):
    """The closest person (smallest distance) matches when distance <= threshold."""
    got = match(main_module, distances, threshold)
    assert (got[0], bool(got[1])) == (best, matched), \
        f"distances {distances} at threshold {threshold}: got {got}, expected ({best}, {matched})"
    assert got[2] == pytest.approx(min(distances)), f"reported distance {got[2]}, expected {min(distances)}"


@pytest.mark.parametrize("distance", [0.1, 0.35, 0.55, 0.6, 0.7, 1.2])
def test_a_lower_threshold_never_matches_more(main_module, distance):
    """Lowering CUSTOM_THRESHOLD is stricter: the matched thresholds are exactly those >= distance."""
    thresholds = [0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 2.0]
    matched = [t for t in thresholds if match(main_module, [distance], t)[1]]
    assert matched == [t for t in thresholds if t >= distance], \
        f"distance {distance} matched at thresholds {matched}"


def test_a_face_identical_to_a_reference_matches_that_person_at_distance_zero(main_module):
    """End to end: person_distances then the matching rule give distance 0 for an identical face."""
    rng = np.random.default_rng(7)
    refs = random_units(rng, 4, 64)
    owners = np.array([0, 1, 1, 2])
    distances = person_distances(refs[2:3], refs, owners, 3)
    best, matched, distance = match(main_module, distances[0], 0.05)
    assert (best, bool(matched)) == (1, True) and distance == pytest.approx(0.0, abs=1e-6), \
        f"identical face: best {best}, matched {matched}, distance {distance}"


def test_an_unrelated_face_does_not_match_at_the_default_threshold(main_module):
    """A face orthogonal to every photo is at distance 1, above the default 0.60: no match."""
    refs = np.stack([unit(1, 0, 0, 0), unit(0, 1, 0, 0)])
    distances = person_distances(np.stack([unit(0, 0, 1, 0)]), refs, np.array([0, 1]), 2)
    threshold = main_module.default_settings()["CUSTOM_THRESHOLD"]
    _, matched, distance = match(main_module, distances[0], threshold)
    assert not matched and distance == pytest.approx(1.0, abs=1e-6), \
        f"orthogonal face: matched {matched} at distance {distance} (threshold {threshold})"
