"""Naming (findpeople/naming.py): cosine DISTANCE to a person's closest photo, the rules that name
a stored track from its looks (agreeing evidence, splits where a look names someone else), the
frames that count as sightings, and the looks worth a snapshot."""
from __future__ import annotations

import main
from pathlib import Path

import numpy as np
import pytest

from findpeople.naming import (
    MAX_SNAPSHOTS, agreeing_person, evaluate_evidence, name_track, person_distances,
    rename_splits, sighting_flags, snapshot_looks, vouching_recognitions)
from findpeople.search import TrackLooks


THRESHOLD, MARGIN, MIN_HITS = 0.6, 0.05, 2  # the CUSTOM_THRESHOLD, MATCH_MARGIN, MIN_TRACK_HITS


PEOPLE = ["Alice", "Bob"]


@pytest.fixture()
def settings(tmp_path):
    """Settings with the issue's matching values."""
    return main.load_settings([
        "--output", str(tmp_path / "out"), "--custom-threshold", str(THRESHOLD),
        "--match-margin", str(MARGIN), "--min-track-hits", str(MIN_HITS)])


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


# vouching_recognitions ---------------------------------------------------------------------------
ALICE_ROW, BOB_ROW, NOBODY_ROW = [0.3, 0.9], [0.9, 0.3], [0.9, 0.9]  # distances to [Alice, Bob]


def test_a_look_vouches_when_it_agrees_or_is_an_unsure_look_at_the_same_face(settings):
    """For a track named Alice: an agreeing look vouches; a look agreeing with nobody vouches only
    when its embedding is within cosine 0.5 of an agreeing look (0.6 yes, 0 no); a look agreeing
    with Bob never does, even with Alice's very embedding."""
    rows = np.array([ALICE_ROW, NOBODY_ROW, NOBODY_ROW, BOB_ROW])
    embeddings = np.stack([unit(1, 0, 0), unit(0.6, 0, 0.8), unit(0, 0, 1), unit(1, 0, 0)])
    got = vouching_recognitions(rows, embeddings, 0, settings)
    assert got == [True, True, False, False], f"vouches {got}"


def test_no_look_vouches_for_a_person_none_of_them_agrees_with(settings):
    """Without an agreeing look, unsure looks have nothing to be the same face as."""
    rows = np.array([NOBODY_ROW, BOB_ROW])
    got = vouching_recognitions(rows, np.stack([unit(1, 0, 0), unit(0, 1, 0)]), 0, settings)
    assert got == [False, False], f"vouches for Alice {got}"


# rename_splits -----------------------------------------------------------------------------------
ROWS = {"A": ALICE_ROW, "B": BOB_ROW, "-": NOBODY_ROW}


@pytest.mark.parametrize("looks, starts", [
    ("AABB", [0, 2]),  # named Alice, then a look at Bob: split there
    ("AA--", [0]),  # a look agreeing with nobody never splits
    ("AA-BB", [0, 3]),
    ("AABBAA", [0, 2, 4]),  # each piece is named afresh from its own looks
    ("ABB", [0]),  # one Alice look (MIN_TRACK_HITS 2) is no name yet: nothing to contradict
    ("AAAA", [0]),
    ("B", [0]),
], ids=["alice-then-bob", "nobody", "nobody-between", "back-and-forth", "no-name-yet", "alice",
        "one-look"])
def test_a_track_is_split_at_the_first_look_agreeing_with_another_person_than_its_name(
        settings, looks, starts):
    """A piece named from its looks so far (MIN_TRACK_HITS 2) ends where a look agrees with
    someone else; the next piece starts at that look."""
    got = rename_splits(np.array([ROWS[c] for c in looks], np.float64), settings)
    assert got == starts, f"looks {looks}: pieces start at {got}, expected {starts}"


# name_track --------------------------------------------------------------------------------------
def stored_track(frame_count: int, looks: dict, track_id: int = 7) -> tuple:
    """Return (faces, TrackLooks) of a track seen in frame_count processed frames (every 2nd
    video frame, 60 px boxes moving 2 px a frame) with looks {row: "A", "B" or "-"} at those rows."""
    frame_idx = 2 * np.arange(frame_count, dtype=np.int64)
    x1 = 2.0 * np.arange(frame_count)
    faces = {"frame_idx": frame_idx, "time_s": frame_idx / 25.0, "score": np.full(frame_count, 0.9),
             "box": np.stack([x1, np.full(frame_count, 10.0), x1 + 60, np.full(frame_count, 70.0)], 1)}
    rows = sorted(looks)
    embedding_of = {"A": unit(1, 0, 0), "B": unit(0, 1, 0), "-": unit(0, 0, 1)}
    track_looks = TrackLooks(Path("video.parquet"), track_id, frame_idx[rows], faces["time_s"][rows],
                             np.stack([embedding_of[looks[r]] for r in rows]),
                             np.array([ROWS[looks[r]] for r in rows], np.float64))
    return faces, track_looks


def sighted_rows(summary: dict) -> list:
    """Return the processed-frame rows (frame_idx / 2) a summary counts as sightings."""
    return [frame[0] // 2 for frame in summary["frames"]]


def test_the_pieces_of_a_split_track_are_named_separately(settings):
    """Looks at Alice (rows 0, 2, 4) then Bob (6, 8, 9) on one track: two summaries of the same
    track, Alice over rows 0-5 (one frame after her last look) and Bob over 6-9; unsplit, 3
    against 3 would name nobody."""
    faces, looks = stored_track(10, {0: "A", 2: "A", 4: "A", 6: "B", 8: "B", 9: "B"})
    got = name_track(faces, looks, PEOPLE, settings)
    assert [(s["track"], s["name"], s["hits"], s["recognitions"]) for s in got] == \
        [(7, "Alice", 3, 3), (7, "Bob", 3, 3)], f"summaries {got}"
    assert [sighted_rows(s) for s in got] == [list(range(6)), list(range(6, 10))], \
        f"sighted rows {[sighted_rows(s) for s in got]}"
    own = {frame[0] // 2: frame[4] for s in got for frame in s["frames"]}
    assert own == {0: 0.3, 1: None, 2: 0.3, 3: None, 4: 0.3, 5: None, 6: 0.3, 7: None, 8: 0.3, 9: 0.3}, \
        f"own distances by row {own}: expected the named person's distance at each look only"


@pytest.mark.parametrize("first_look, sighted_from", [(0, 0), (1, 0), (2, 1), (4, 3)])
def test_a_frame_before_the_first_look_counts_only_within_one_frame(settings, first_look, sighted_from):
    """A track seen in rows 0-5 with Alice's looks at first_look and row 5: the sightings start
    one processed frame before the first look (a doubtful first face, recognised a frame later)."""
    faces, looks = stored_track(6, {first_look: "A", 5: "A"})
    (summary,) = name_track(faces, looks, PEOPLE, settings)
    assert sighted_rows(summary) == list(range(sighted_from, 6)), \
        f"first look at row {first_look}: sighted rows {sighted_rows(summary)}"


@pytest.mark.parametrize("debug_rec", [False, True], ids=["quiet", "debug-rec"])
def test_an_unnamed_track_is_summarised_only_with_debug_rec_and_has_no_sightings(tmp_path, debug_rec):
    """A track of strangers' looks: nothing without debug_rec; with it one summary without a name,
    sightings or snapshots, whose debug_rec lists each look's distance to each person."""
    settings = main.load_settings(["--output", str(tmp_path), "--custom-threshold", str(THRESHOLD),
                                   *(["--debug-rec"] if debug_rec else [])])
    faces, looks = stored_track(5, {0: "-", 4: "-"})
    got = name_track(faces, looks, PEOPLE, settings)
    if not debug_rec:
        assert got == [], f"summaries {got}"
        return
    assert [(s["name"], s["person"], s["hits"], s["frames"], s["snapshot_looks"]) for s in got] == \
        [(None, None, 0, [], [])], f"summaries {got}"
    assert got[0]["debug_rec"] == [[0, 0.0, {"Alice": 0.9, "Bob": 0.9}],
                                   [8, 0.32, {"Alice": 0.9, "Bob": 0.9}]], got[0]["debug_rec"]


# snapshot_looks ----------------------------------------------------------------------------------
def look_faces(count: int) -> tuple:
    """Return (look_rows, frame_idx, time_s, boxes) of a track whose looks are at every 3rd of
    its 3 * count faces (frame_idx 10 + face row)."""
    frame_idx = 10 + np.arange(3 * count)
    boxes = np.stack([frame_idx, frame_idx + 1, frame_idx + 50, frame_idx + 51], 1).astype(np.float64)
    return 3 * np.arange(count), frame_idx, frame_idx / 25.0, boxes


def test_snapshots_are_the_looks_agreeing_with_the_named_person(settings):
    """Of looks at Alice (0.3), nobody, Bob and Alice (0.2), the snapshots of a track named Alice
    are her two agreeing looks, each with its face's frame, time, box and her distance."""
    rows = np.array([ALICE_ROW, NOBODY_ROW, BOB_ROW, [0.2, 0.9]])
    look_rows, frame_idx, time_s, boxes = look_faces(4)
    got = snapshot_looks(rows, 0, look_rows, frame_idx, time_s, boxes, settings)
    assert got == [(10, 0.4, [10.0, 11.0, 60.0, 61.0], 0.3), (19, 0.76, [19.0, 20.0, 69.0, 70.0], 0.2)], \
        f"snapshot looks {got}"
    assert snapshot_looks(rows, 1, look_rows, frame_idx, time_s, boxes, settings) == \
        [(16, 0.64, [16.0, 17.0, 66.0, 67.0], 0.3)], "Bob's snapshots: his one agreeing look"


def test_at_most_max_snapshots_closest_looks_are_kept_in_frame_order(settings):
    """Of 3 * MAX_SNAPSHOTS agreeing looks at shuffled distances, the MAX_SNAPSHOTS closest are
    kept, listed in frame order."""
    count = 3 * MAX_SNAPSHOTS
    distances = np.random.default_rng(5).permutation(np.linspace(0.1, 0.5, count))
    rows = np.stack([distances, np.full(count, 0.95)], 1)
    look_rows, frame_idx, time_s, boxes = look_faces(count)
    got = snapshot_looks(rows, 0, look_rows, frame_idx, time_s, boxes, settings)
    closest = sorted(np.argsort(distances)[:MAX_SNAPSHOTS])
    assert [g[0] for g in got] == [int(frame_idx[look_rows[i]]) for i in closest], \
        f"snapshot frames {[g[0] for g in got]}"
    assert [g[3] for g in got] == pytest.approx([distances[i] for i in closest]), f"distances {got}"


def test_rename_splits_in_one_pass_splits_where_re_evaluating_every_prefix_would(settings):
    """rename_splits keeps running votes; on random tracks (agreeing looks, looks agreeing with
    nobody, three people) its splits are those of evaluating every prefix of the piece with
    evaluate_evidence, as the tracker used to."""
    from findpeople.naming import agreeing_person, evaluate_evidence, rename_splits

    def by_prefixes(distances):
        starts, name = [0], None
        for i, row in enumerate(distances):
            now = agreeing_person(row, settings.CUSTOM_THRESHOLD, settings.MATCH_MARGIN)
            if name is not None and now is not None and now != name:
                starts.append(i)
                name = None
            if name is None:
                name = evaluate_evidence(distances[starts[-1]:i + 1], settings.CUSTOM_THRESHOLD,
                                         settings.MATCH_MARGIN, settings.MIN_TRACK_HITS)[0]
        return starts
    rng = np.random.default_rng(3)
    split = 0
    for _ in range(300):
        distances = rng.uniform(settings.CUSTOM_THRESHOLD - 0.3, settings.CUSTOM_THRESHOLD + 0.3,
                                (int(rng.integers(1, 30)), 3))
        assert rename_splits(distances, settings) == by_prefixes(distances)
        split += len(by_prefixes(distances)) > 1
    assert split > 30, "the random tracks hardly ever split: the comparison proves little"
