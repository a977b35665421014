"""Same answers from the index: a search that reuses the indexes gives what a fresh run gives.

The session's fresh run (conftest `search`: every shared clip, every reference, distractors
included) wrote its indexes beside its output folder. Searching them again, or searching them
first for Barack Obama alone and then for everybody, must give the fresh run's names, ranges and
sightings exactly, and decode nothing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import TESTDATA, answers, link_all_refs, run_main, search_command


def search_again(base: Path, refs: Path, index: Path, name: str) -> tuple:
    """Run main.py on the shared clips with these photos and this index folder; return (exit
    code, output, results.json)."""
    output = base / name
    code, text = run_main(search_command(TESTDATA / "videos", refs, output, index=index), base)
    return code, text, json.loads((output / "results.json").read_text())


@pytest.fixture(scope="module")
def obama_then_all(search, tmp_path_factory):
    """Search the fresh run's indexes for Barack Obama alone, then for everybody."""
    base = tmp_path_factory.mktemp("obama_then_all")
    index = search["out"].with_name(search["out"].name + "_index")
    obama = base / "obama_refs"
    obama.mkdir()
    os.symlink(TESTDATA / "refs" / "Barack_Obama.jpg", obama / "Barack_Obama.jpg")
    first = search_again(base, obama, index, "out_obama")
    second = search_again(base, link_all_refs(base / "refs"), index, "out_all")
    return {"first": first, "second": second}


def test_the_fresh_run_found_the_shared_people(search):
    """The comparison below is not between two empty results: the fresh run named Barack
    Obama, Michelle Obama and Lin-Manuel Miranda, and ended "ok"."""
    assert search["done"].returncode == 0, search["done"].stderr[-2000:]
    named = {r["name"] for v in search["results"]["videos"] for r in v["ranges"]}
    assert {"Barack_Obama", "Michelle_Obama", "Lin_Manuel_Miranda"} <= named, named


def test_a_search_from_the_index_gives_the_fresh_runs_answers_and_decodes_nothing(
        search, tmp_path):
    """The same photos and settings searched again from the fresh run's indexes: identical
    names, ranges and sightings; every index reused, not a frame decoded."""
    index = search["out"].with_name(search["out"].name + "_index")
    code, text, results = search_again(tmp_path, link_all_refs(tmp_path / "refs"), index, "out")
    assert code == 0, text[-3000:]
    assert answers(results) == answers(search["results"])
    assert results["stats"]["processed_frames"] == 0, results["stats"]
    assert len(results["stats"]["index_reused_videos"]) == 3, text[-2000:]
    assert "3 video(s) reused, 0 to index" in text, text[-2000:]


def test_obama_alone_then_everybody_gives_the_fresh_runs_answers(search, obama_then_all):
    """Searching first for Obama alone, then for all the shared people, gives results identical
    to the fresh run with all of them (names, ranges, sightings), and decodes nothing."""
    code, text, results = obama_then_all["second"]
    assert code == 0, text[-3000:]
    assert answers(results) == answers(search["results"])
    assert results["stats"]["processed_frames"] == 0, results["stats"]


def test_the_search_for_obama_alone_names_only_him_where_the_fresh_run_did(search, obama_then_all):
    """Obama alone: his ranges are found from the index, and nobody else is named (with fewer
    photos, a look can only agree with him)."""
    code, text, results = obama_then_all["first"]
    assert code == 0, text[-3000:]
    named = {r["name"] for v in results["videos"] for r in v["ranges"]}
    assert named == {"Barack_Obama"}, named
    fresh = {Path(v["file"]).name for v in search["results"]["videos"]
             for r in v["ranges"] if r["name"] == "Barack_Obama"}
    alone = {Path(v["file"]).name for v in results["videos"] for r in v["ranges"]}
    assert alone == fresh, (alone, fresh)
