"""Unnamed people (findpeople/people.py, issue #14): the tracks no photo named, grouped into people.

Measured on the shared clips with only Lin-Manuel Miranda's photo (the session's fresh run's
indexes are reused, so nothing is decoded again): Barack Obama's tracks in two videos are one
group covering most of his time, Michelle Obama is another, no group mixes two people, the crowd
does not become one group; and naming a group takes one command.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TESTDATA, run_main, search_command
from findpeople.decode import probe_video
from findpeople.index import index_path
from findpeople.people import (
    GROUP_DISTANCE, TrackSummary, group_tracks, parse_name_spec, people_table, unnamed_people)
from findpeople.errors import BadInput
from findpeople.resume import video_fingerprint

GROUND_TRUTH = json.loads((TESTDATA / "ground_truth.json").read_text())


def run_with(base: Path, refs: Path, index: Path, *extra: str) -> tuple:
    """Run main.py on the shared clips with these photos and index; return (code, text, results)."""
    output = base / "out"
    code, text = run_main(search_command(TESTDATA / "videos", refs, output, *extra, index=index), base)
    results = output / "results.json"
    return code, text, json.loads(results.read_text()) if results.is_file() else None


@pytest.fixture(scope="module")
def lin_only(search, tmp_path_factory):
    """A search of the fresh run's indexes with only Lin-Manuel Miranda's photo."""
    base = tmp_path_factory.mktemp("lin_only")
    refs = base / "refs"
    refs.mkdir()
    os.symlink(TESTDATA / "refs" / "Lin_Manuel_Miranda.jpg", refs / "Lin_Manuel_Miranda.jpg")
    index = search["out"].with_name(search["out"].name + "_index")
    code, text, results = run_with(base, refs, index)
    assert code == 0, text[-3000:]
    return {"base": base, "refs": refs, "index": index, "text": text, "results": results}


def covered_s(ranges: list, truth: list) -> float:
    """Return how many seconds of the ground-truth ranges the found ranges cover."""
    return sum(max(0.0, min(e, te) - max(s, ts)) for s, e in ranges for ts, te in truth)


def test_obama_is_one_group_in_both_videos_covering_most_of_his_time(lin_only):
    """Barack Obama (no photo given): one group holds his tracks in obama_whcd.mp4 and in
    short_hamilton_clip.mp4, covering at least 80 % of his ground-truth time in each."""
    people = lin_only["results"]["unnamed_people"]
    in_whcd = [p for p in people if any(Path(v["file"]).name == "obama_whcd.mp4" for v in p["videos"])]
    assert len(in_whcd) == 1, f"obama_whcd.mp4 (only Obama in it) is in {len(in_whcd)} groups"
    group = {Path(v["file"]).name: [(r["start"], r["end"]) for r in v["ranges"]]
             for v in in_whcd[0]["videos"]}
    for video in ("obama_whcd.mp4", "short_hamilton_clip.mp4"):
        truth = GROUND_TRUTH[video]["Barack_Obama"]
        share = covered_s(group.get(video, []), truth) / sum(e - s for s, e in truth)
        assert share >= 0.8, f"{video}: the group covers {share:.0%} of Obama's time ({group})"


def track_labels(lin_only, cpu_models, test_settings) -> list:
    """Return, per group (computed in-process as the run did), the person each track's template
    is closest to among the shared reference photos (None below a cosine similarity of 0.2)."""
    from findpeople.references import load_references, reference_matrix
    results = lin_only["results"]
    videos = [probe_video(Path(v["file"]), i, v["output_folder"]) for i, v in enumerate(results["videos"])]
    files = [index_path(lin_only["index"], v["output_folder"]) for v in results["videos"]]
    named = [{d["track"] for d in v["detections"]} for v in results["videos"]]
    keys = [json.dumps(video_fingerprint(v["file"]), sort_keys=True) for v in results["videos"]]
    settings = test_settings
    groups, problems = unnamed_people(files, named, videos, settings, keys)
    assert problems == []
    refs = load_references(TESTDATA / "refs", cpu_models, settings)[0]
    photos, owners = reference_matrix(refs)
    labels = []
    for group in groups:
        similarity = np.stack([t.template for t in group.tracks]) @ photos.T
        labels.append([refs[owners[i]].name if similarity[k, i] >= 0.2 else None
                       for k, i in enumerate(similarity.argmax(axis=1))])
    return groups, labels


def test_no_group_mixes_two_people_and_michelle_is_not_in_obamas(lin_only, cpu_models, test_settings):
    """Each group's tracks resemble at most one of the shared people's photos; Michelle Obama's
    tracks form a group of their own, apart from Barack Obama's; the groups computed in-process
    are the run's (same ids)."""
    groups, labels = track_labels(lin_only, cpu_models, test_settings)
    assert [g.id for g in groups] == [p["id"] for p in lin_only["results"]["unnamed_people"]]
    for group, names in zip(groups, labels):
        assert len(set(names) - {None}) <= 1, f"group {group.id} mixes {names}"
    of = {name: [g.id for g, names in zip(groups, labels) if name in names]
          for name in ("Barack_Obama", "Michelle_Obama")}
    assert len(of["Barack_Obama"]) == 1 and len(of["Michelle_Obama"]) == 1, of
    assert of["Barack_Obama"] != of["Michelle_Obama"], of


def test_the_crowd_does_not_become_one_big_group(lin_only):
    """The crowd clip's many faces stay apart: no group holds more than 3 of its tracks' ranges,
    and it shows several groups."""
    people = lin_only["results"]["unnamed_people"]
    crowd = [p for p in people if any("crowd" in Path(v["file"]).name for v in p["videos"])]
    assert len(crowd) >= 3, [p["id"] for p in crowd]
    assert max(p["tracks"] for p in crowd) <= 3, [(p["id"], p["tracks"]) for p in crowd]


def test_groups_are_sorted_by_screen_time_with_a_face_crop_each(lin_only):
    """results.json's unnamed_people: most screen time first, each with its best face saved."""
    people = lin_only["results"]["unnamed_people"]
    times = [p["screen_time_s"] for p in people]
    assert people and times == sorted(times, reverse=True), times
    out = lin_only["base"] / "out"
    assert all(p["snapshot"] and (out / p["snapshot"]).is_file() for p in people)
    assert "Other people in these videos" in (out / "index.html").read_text()
    assert f"--name-person {people[0]['id']}=" in (out / "index.html").read_text()


def test_people_prints_the_groups_and_writes_nothing(lin_only):
    """--people prints one line per group (id, screen time) and changes no file."""
    out = lin_only["base"] / "out"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, text = run_main([*search_command(TESTDATA / "videos", lin_only["refs"], out)[:2],
                           "--output", str(out), "--people"], lin_only["base"])
    assert code == 0, text
    for person in lin_only["results"]["unnamed_people"]:
        assert person["id"] in text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_naming_a_group_saves_its_face_and_the_search_then_names_him(lin_only, tmp_path):
    """--name-person <Obama's group>=Barack_Obama writes refs/Barack_Obama.jpg and searches
    again from the index: Barack Obama is named in both his videos, and his group and its face
    crop are gone; naming it again is refused (exit 2) and changes nothing."""
    import shutil
    shutil.copytree(lin_only["base"] / "out", tmp_path / "out")
    refs = tmp_path / "refs"
    shutil.copytree(lin_only["refs"], refs, symlinks=True)
    people = lin_only["results"]["unnamed_people"]
    obama = next(p for p in people if any(Path(v["file"]).name == "obama_whcd.mp4" for v in p["videos"]))
    code, text, results = run_with(tmp_path, refs, lin_only["index"], "--name-person",
                                   f"{obama['id']}=Barack_Obama")
    assert code == 0, text[-3000:]
    assert (refs / "Barack_Obama.jpg").is_file() and "3 video(s) reused, 0 to index" in text
    found = {Path(v["file"]).name for v in results["videos"] for r in v["ranges"] if r["name"] == "Barack_Obama"}
    assert found == {"obama_whcd.mp4", "short_hamilton_clip.mp4"}, found
    assert obama["id"] not in {p["id"] for p in results["unnamed_people"]}
    assert not (tmp_path / "out" / obama["snapshot"]).exists(), "a named group's face crop was left"
    photo = (refs / "Barack_Obama.jpg").read_bytes()
    code, text, _ = run_with(tmp_path, refs, lin_only["index"], "--name-person",
                             f"{people[1]['id']}=Barack_Obama")
    assert code == 2 and "already has photos of Barack_Obama" in text, text
    assert (refs / "Barack_Obama.jpg").read_bytes() == photo


@pytest.mark.parametrize("spec, words", [
    ("Pnope=Somebody", "no unnamed person Pnope"),
    ("nothing", "write it as ID=Name"),
    ("P1=a/b", "cannot be a file name"),
    ("P1=..", "cannot be a file name"),
])
def test_a_bad_name_person_request_exits_2_and_changes_nothing(lin_only, tmp_path, spec, words):
    """An unknown id, a malformed request or a name that cannot be a file: a clear message,
    exit code 2, no photo written."""
    refs = tmp_path / "refs"
    refs.mkdir()
    code, text = run_main([*search_command(TESTDATA / "videos", refs, lin_only["base"] / "out")[:2],
                           "--output", str(lin_only["base"] / "out"), "--refs", str(refs),
                           "--name-person", spec], tmp_path)
    assert code == 2 and words in text, text
    assert list(refs.iterdir()) == []


def summary(video: int, track: int, vector: np.ndarray) -> TrackSummary:
    """Return a TrackSummary with this template (normalised)."""
    return TrackSummary(video, track, vector / np.linalg.norm(vector), 0.0, 1.0, (1.0, 0.5, [0, 0, 9, 9]))


def test_grouping_joins_close_templates_and_keeps_far_ones_apart():
    """Templates closer than GROUP_DISTANCE (cosine) join one group, farther ones stay apart;
    groups smaller than min_tracks are dropped; one track alone is a group."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(64), rng.standard_normal(64)
    close = [summary(0, i, a + 0.3 * rng.standard_normal(64)) for i in range(3)]
    far = [summary(1, i, b + 0.3 * rng.standard_normal(64)) for i in range(2)]
    groups = group_tracks(close + far, 1)
    assert sorted(len(g.tracks) for g in groups) == [2, 3]
    assert [len(g.tracks) for g in group_tracks(close + far, 3)] == [3]
    assert len(group_tracks(close[:1], 1)) == 1 and group_tracks([], 1) == []
    assert 0 < GROUP_DISTANCE < 1


def test_no_unnamed_people_is_said_in_words():
    """An index with no unnamed tracks gives an empty list, and the table says so."""
    assert "no unnamed people" in people_table([])


@pytest.mark.parametrize("spec, parsed", [("P12ab34cd=Barack_Obama", ("P12ab34cd", "Barack_Obama")),
                                          (" P1 = Jo-Ann ", ("P1", "Jo-Ann"))])
def test_a_name_person_request_is_an_id_and_a_file_name(spec, parsed):
    """ID=Name splits at the first '='; spaces around either part are dropped."""
    assert parse_name_spec(spec) == parsed
    with pytest.raises(BadInput):
        parse_name_spec("P1=")


def test_grouping_by_linked_sets_gives_the_groups_of_one_clustering_of_all_tracks():
    """group_tracks clusters each set of tracks linked by pairs closer than the cut on its own:
    on random people with looks of every spread, the groups are exactly those of one
    average-linkage clustering of all tracks, cut at GROUP_DISTANCE."""
    from scipy.cluster.hierarchy import fcluster, linkage
    rng = np.random.default_rng(1)
    for _ in range(3):
        centres = rng.standard_normal((40, 64))
        vectors = np.concatenate([c + rng.uniform(0.3, 1.2) * rng.standard_normal((rng.integers(1, 8), 64))
                                  for c in centres])
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        groups = group_tracks([summary(0, i, v) for i, v in enumerate(vectors)], 1)
        labels = fcluster(linkage(vectors.astype(np.float64), method="average", metric="cosine"),
                          t=GROUP_DISTANCE, criterion="distance")
        whole = sorted(np.flatnonzero(labels == label).tolist() for label in np.unique(labels))
        assert sorted(sorted(t.track_id for t in g.tracks) for g in groups) == whole
        assert 1 < len(whole) < len(vectors)


@pytest.mark.parametrize("name", ["Barack_Obama", "barack-obama", "Barack_Obama_2", "BARACK OBAMA"])
def test_a_name_whose_person_already_has_photos_is_refused(lin_only, tmp_path, name):
    """A name the reference loader would file under an existing person (case, spaces, '_', '-',
    a _2 suffix) is refused with exit code 2: a stranger's face never joins someone's photos."""
    refs = tmp_path / "refs"
    refs.mkdir()
    os.symlink(TESTDATA / "refs" / "Barack_Obama.jpg", refs / "Barack_Obama.jpg")
    person = lin_only["results"]["unnamed_people"][0]["id"]
    code, text = run_main([*search_command(TESTDATA / "videos", refs, lin_only["base"] / "out")[:2],
                           "--output", str(lin_only["base"] / "out"), "--refs", str(refs),
                           "--name-person", f"{person}={name}"], tmp_path)
    assert code == 2 and "already has photos of Barack_Obama" in text, text
    assert sorted(p.name for p in refs.iterdir()) == ["Barack_Obama.jpg"]


def test_people_before_any_search_or_after_an_interrupted_one_says_what_to_do(tmp_path):
    """--people with no results.json yet, or one without unnamed_people (an interrupted search),
    or one that is not JSON: exit code 2 and a message saying to run a search; nothing written."""
    from conftest import REPO
    out = tmp_path / "out"
    out.mkdir()
    cases = [(None, "no search in"), ({"videos": []}, "lists no unnamed people"), ("{", "cannot be read")]
    for content, words in cases:
        if content is not None:
            (out / "results.json").write_text(content if isinstance(content, str) else json.dumps(content))
        code, text = run_main([sys.executable, str(REPO / "main.py"), "--output", str(out),
                               "--people"], tmp_path)
        assert code == 2 and words in text, (content, text)
        assert sorted(p.name for p in out.iterdir()) == ([] if content is None else ["results.json"])
