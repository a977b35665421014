"""Section 5, Matching: cosine DISTANCE to a person's closest photo; match when <= threshold."""
from __future__ import annotations

import numpy as np
import pytest


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
    distances = main_module.person_distances(faces, refs, owners, 2)
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
    distances = main_module.person_distances(faces, refs, owners, len(photos_per_person))
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
    distances = main_module.person_distances(faces, refs, owners, 2)
    assert np.allclose(distances, [[1.0, 0.0], [0.0, 1.0]], atol=1e-6), f"distances\n{distances}"


@pytest.mark.parametrize("face, expected_distance", [
    ((1, 0, 0), 0.0),  # identical: similarity 1, distance 0
    ((0, 1, 0), 1.0),  # orthogonal: similarity 0, distance 1
    ((-1, 0, 0), 2.0),  # opposite: similarity -1, distance 2
    ((1, 1, 0), 1 - 2 ** -0.5),  # 45 degrees
], ids=["identical", "orthogonal", "opposite", "45deg"])
def test_distance_is_one_minus_similarity_never_the_similarity(main_module, face, expected_distance):
    """Distance and similarity are never swapped: identical faces are at distance 0, not 1."""
    distances = main_module.person_distances(np.stack([unit(*face)]), np.stack([unit(1, 0, 0)]),
                                             np.array([0]), 1)
    assert float(distances[0, 0]) == pytest.approx(expected_distance, abs=1e-6), \
        f"face {face}: distance {float(distances[0, 0])}, expected {expected_distance}"


# threshold semantics, through agreeing_person (the rule the tracker uses) ----------------------
def match(main_module, distances, threshold):
    """Return (closest person, matched?, distance) as the tracker decides it, margin 0."""
    distances = np.asarray(distances, dtype=np.float64)
    person = main_module.agreeing_person(distances, threshold, 0.0)
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
    distances = main_module.person_distances(refs[2:3], refs, owners, 3)
    best, matched, distance = match(main_module, distances[0], 0.05)
    assert (best, bool(matched)) == (1, True) and distance == pytest.approx(0.0, abs=1e-6), \
        f"identical face: best {best}, matched {matched}, distance {distance}"


def test_an_unrelated_face_does_not_match_at_the_default_threshold(main_module):
    """A face orthogonal to every photo is at distance 1, above the default 0.60: no match."""
    refs = np.stack([unit(1, 0, 0, 0), unit(0, 1, 0, 0)])
    distances = main_module.person_distances(np.stack([unit(0, 0, 1, 0)]), refs, np.array([0, 1]), 2)
    threshold = main_module.default_settings()["CUSTOM_THRESHOLD"]
    _, matched, distance = match(main_module, distances[0], threshold)
    assert not matched and distance == pytest.approx(1.0, abs=1e-6), \
        f"orthogonal face: matched {matched} at distance {distance} (threshold {threshold})"
