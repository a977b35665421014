"""bench/scoring.py: frame-by-frame true/false positives against hand-made ground-truth ranges,
ignoring frames within margin_s of a range boundary; recall, precision and F1 per person."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import scoring  # noqa: E402  (bench/ is not a package)

FRAME_TIMES = {i: i * 0.5 for i in range(10)}  # frames 0..9 at 0.0, 0.5, ..., 4.5 s


# score_video --------------------------------------------------------------------------------
def test_counts_true_positives_misses_and_false_positives_per_frame():
    """Alice is in [1.0, 3.0] s: named at 1.5 and 2.0 s (tp 2), missed at 2.5 s (fn 1), named at
    4.0 s where absent (fp 1); frames at the boundaries 1.0 and 3.0 s are ignored."""
    found = {"Alice": {3, 4, 8, 2, 6}}  # 2 and 6 are the boundary frames (1.0 s and 3.0 s)
    got = scoring.score_video(FRAME_TIMES, found, {"Alice": [[1.0, 3.0]]}, margin_s=0.1)
    assert got == {"Alice": {"tp": 2, "fp": 1, "fn": 1}}, f"counts {got}"


@pytest.mark.parametrize("time_s, margin_s, ignored", [
    (1.0, 0.1, True),  # on the start
    (1.05, 0.1, True),  # within the margin after the start
    (0.95, 0.1, True),  # within the margin before the start
    (1.2, 0.1, False),  # beyond the margin
    (0.8, 0.1, False),
    (3.0, 0.1, True),  # on the end
    (1.0, 0.0, True),  # margin 0: only the boundary itself
    (1.01, 0.0, False),
    (2.0, 1.0, True),  # a wide margin covers the whole range
], ids=["start", "after-start", "before-start", "beyond-after", "beyond-before", "end",
        "margin-0-on", "margin-0-off", "wide-margin"])
def test_frames_within_margin_of_a_boundary_are_ignored(time_s, margin_s, ignored):
    """A frame within margin_s of a start or end of the person's range counts neither way."""
    truth = {"Alice": [[1.0, 3.0]]}
    got = scoring.score_video({0: time_s}, {"Alice": {0}}, truth, margin_s=margin_s)
    total = sum(got["Alice"].values())
    assert total == (0 if ignored else 1), \
        f"frame at {time_s} s, margin {margin_s} s, range [1.0, 3.0]: counts {got['Alice']}, " \
        f"expected it {'ignored' if ignored else 'counted'}"


def test_only_the_persons_own_boundaries_are_ignored():
    """Bob's range boundary at 2.0 s does not hide Alice's frame at 2.0 s."""
    truth = {"Alice": [[1.0, 3.0]], "Bob": [[2.0, 4.0]]}
    got = scoring.score_video({0: 2.0}, {"Alice": {0}}, truth, margin_s=0.1)
    assert got["Alice"] == {"tp": 1, "fp": 0, "fn": 0}, f"Alice {got['Alice']}"
    assert got["Bob"] == {"tp": 0, "fp": 0, "fn": 0}, f"Bob at his own boundary: {got['Bob']}"


def test_a_person_named_where_absent_is_a_false_positive():
    """A person not in the ground truth at all: every frame they are named in is a false positive."""
    got = scoring.score_video(FRAME_TIMES, {"Bob": {0, 1, 9}}, {"Alice": [[1.0, 3.0]]}, margin_s=0.1)
    assert got["Bob"] == {"tp": 0, "fp": 3, "fn": 0}, f"Bob {got['Bob']}"
    assert got["Alice"] == {"tp": 0, "fp": 0, "fn": 3}, f"Alice never named: {got['Alice']}"


def test_a_person_never_named_misses_every_judged_frame_of_their_ranges():
    """Present in two ranges and never named: one miss per judged frame inside them."""
    truth = {"Alice": [[0.0, 1.0], [3.0, 4.5]]}  # judged inside: 0.5 s; 3.5, 4.0 s
    got = scoring.score_video(FRAME_TIMES, {}, truth, margin_s=0.1)
    assert got == {"Alice": {"tp": 0, "fp": 0, "fn": 3}}, f"counts {got}"


def test_frames_between_ranges_named_are_false_positives():
    """Named in the gap between two of the person's ranges: false positives."""
    truth = {"Alice": [[0.0, 1.0], [3.0, 4.5]]}
    got = scoring.score_video(FRAME_TIMES, {"Alice": {4, 5}}, truth, margin_s=0.1)  # 2.0 and 2.5 s
    assert got == {"Alice": {"tp": 0, "fp": 2, "fn": 3}}, f"counts {got}"


def test_no_frames_and_no_people_give_no_counts():
    """Nothing found and no ground truth: an empty result."""
    assert scoring.score_video(FRAME_TIMES, {}, {}) == {}


# summarize ----------------------------------------------------------------------------------
@pytest.mark.parametrize("counts, recall, precision, f1", [
    ({"tp": 2, "fp": 1, "fn": 1}, 2 / 3, 2 / 3, 2 / 3),
    ({"tp": 3, "fp": 0, "fn": 1}, 0.75, 1.0, 6 / 7),
    ({"tp": 1, "fp": 3, "fn": 0}, 1.0, 0.25, 0.4),
    ({"tp": 0, "fp": 0, "fn": 3}, 0.0, None, 0.0),  # never named: no precision, F1 0
    ({"tp": 0, "fp": 2, "fn": 1}, 0.0, 0.0, 0.0),
    ({"tp": 0, "fp": 0, "fn": 0}, None, None, None),  # nothing to judge
], ids=["2-1-1", "3-0-1", "1-3-0", "never-named", "all-wrong", "nothing"])
def test_summary_gives_recall_precision_and_f1_with_none_where_undefined(counts, recall, precision, f1):
    """recall = tp/(tp+fn), precision = tp/(tp+fp), F1 their harmonic mean; None where undefined."""
    got = scoring.summarize({"Alice": counts})["Alice"]
    expected = {**counts, "recall": recall, "precision": precision, "f1": f1}
    assert got == pytest.approx(expected), f"summary of {counts}: {got}, expected {expected}"


@pytest.mark.parametrize("tp, fp, fn", [
    (2, 1, 1), (3, 0, 1), (1, 3, 0), (0, 0, 3), (0, 2, 1), (5, 0, 0),
    (0, 2, 0),  # named only where absent: every answer wrong, so F1 is 0 (not undefined)
], ids=["2-1-1", "3-0-1", "1-3-0", "never-named", "all-wrong", "perfect", "only-false-positives"])
def test_f1_is_two_tp_over_two_tp_plus_fp_plus_fn_whenever_anything_was_judged(tp, fp, fn):
    """F1 = 2tp / (2tp + fp + fn), defined whenever tp + fp + fn > 0."""
    got = scoring.summarize({"Bob": {"tp": tp, "fp": fp, "fn": fn}})["Bob"]["f1"]
    expected = 2 * tp / (2 * tp + fp + fn)
    assert got == pytest.approx(expected), f"tp {tp}, fp {fp}, fn {fn}: f1 {got}, expected {expected}"


def test_summary_keeps_every_person():
    """One summary entry per person of the counts."""
    counts = {"Alice": {"tp": 1, "fp": 0, "fn": 0}, "Bob": {"tp": 0, "fp": 1, "fn": 0}}
    assert set(scoring.summarize(counts)) == {"Alice", "Bob"}


# merge_counts -------------------------------------------------------------------------------
def test_merge_counts_adds_up_over_videos():
    """Counts of the same person add up; a person in one video only is carried over."""
    first = {"Alice": {"tp": 2, "fp": 1, "fn": 0}, "Bob": {"tp": 0, "fp": 3, "fn": 1}}
    second = {"Alice": {"tp": 5, "fp": 0, "fn": 2}, "Carol": {"tp": 1, "fp": 1, "fn": 1}}
    got = scoring.merge_counts(first, second)
    expected = {"Alice": {"tp": 7, "fp": 1, "fn": 2}, "Bob": {"tp": 0, "fp": 3, "fn": 1},
                "Carol": {"tp": 1, "fp": 1, "fn": 1}}
    assert got == expected, f"merged {got}, expected {expected}"
    assert first["Alice"] == {"tp": 2, "fp": 1, "fn": 0}, f"input changed: {first}"


@pytest.mark.parametrize("many, expected", [
    ((), {}),
    (({"A": {"tp": 1, "fp": 2, "fn": 3}},), {"A": {"tp": 1, "fp": 2, "fn": 3}}),
    (({"A": {"tp": 1, "fp": 0, "fn": 0}},) * 3, {"A": {"tp": 3, "fp": 0, "fn": 0}}),
], ids=["none", "one", "three-same"])
def test_merge_counts_of_none_one_or_repeated_videos(many, expected):
    """No videos give no counts; one video gives its own; repeats add up."""
    got = scoring.merge_counts(*many)
    assert got == expected, f"merged {got}, expected {expected}"


def test_merged_counts_score_like_one_long_video():
    """Scoring two videos and merging equals the per-frame sums over both."""
    truth = {"Alice": [[1.0, 3.0]]}
    first = scoring.score_video(FRAME_TIMES, {"Alice": {3, 8}}, truth)
    second = scoring.score_video(FRAME_TIMES, {"Alice": {3, 4, 5}}, truth)
    got = scoring.summarize(scoring.merge_counts(first, second))["Alice"]
    assert (got["tp"], got["fp"], got["fn"]) == (4, 1, 2), f"merged summary {got}"
    assert got["recall"] == pytest.approx(4 / 6) and got["precision"] == pytest.approx(4 / 5), got
