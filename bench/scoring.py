"""Score found people against a hand-made ground truth, frame by frame (used by bench.py).

Ground truth: {video file name: {person: [[start_s, end_s], ...]}}, times from the first video
frame. A processed frame counts for a person when its time lies in one of their ranges; frames
within `margin_s` of any range boundary of that person are ignored (cuts are exact to about one
frame, so those frames cannot be judged).
"""
from __future__ import annotations


def near_boundary(time_s: float, ranges: list, margin_s: float) -> bool:
    """Return True when time_s is within margin_s of a start or end of any range."""
    return any(abs(time_s - edge) <= margin_s for r in ranges for edge in r)


def inside(time_s: float, ranges: list) -> bool:
    """Return True when time_s lies in one of the [start, end] ranges."""
    return any(start <= time_s <= end for start, end in ranges)


def score_video(frame_times: dict, found: dict, truth: dict, margin_s: float = 0.1) -> dict:
    """Return {person: {tp, fp, fn}} for one video.

    frame_times: {frame_idx: time_s} of every processed frame; found: {person: set of frame_idx}
    where the person was named; truth: {person: [[start_s, end_s], ...]}.
    """
    counts = {}
    for person in sorted(set(truth) | set(found)):
        ranges = truth.get(person, [])
        named = found.get(person, set())
        tp = fp = fn = 0
        for frame_idx, time_s in frame_times.items():
            if near_boundary(time_s, ranges, margin_s):
                continue
            present, said = inside(time_s, ranges), frame_idx in named
            tp += present and said
            fp += said and not present
            fn += present and not said
        counts[person] = {"tp": tp, "fp": fp, "fn": fn}
    return counts


def summarize(counts: dict) -> dict:
    """Return {person: {recall, precision, f1, tp, fp, fn}} (None where undefined)."""
    summary = {}
    for person, c in counts.items():
        recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else None
        precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else None
        judged = 2 * c["tp"] + c["fp"] + c["fn"]
        f1 = 2 * c["tp"] / judged if judged else None
        summary[person] = {**c, "recall": recall, "precision": precision, "f1": f1}
    return summary


def merge_counts(*many: dict) -> dict:
    """Return per-person counts added over several videos."""
    total = {}
    for counts in many:
        for person, c in counts.items():
            t = total.setdefault(person, {"tp": 0, "fp": 0, "fn": 0})
            for key in t:
                t[key] += c[key]
    return total
