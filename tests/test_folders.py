"""Input folders (findpeople/folders.py): links to folders are followed, each real folder and
each file once, a loop is noted once, a dead link is named, output folder names never clash
(issue #11)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from findpeople.folders import (
    file_identity, list_videos, listed_only_to_be_named, unique_output_names, walk_folder)


def touch(path: Path, data: bytes = b"not really a video") -> Path:
    """Write a small file (its content does not matter for listing), making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture()
def linked_tree(tmp_path) -> Path:
    """videos/ with a file, a subfolder, a link to a folder outside, a link to its own subfolder,
    a loop (sub/up -> ..) and a dead link; outside/ holds one more file."""
    videos = tmp_path / "videos"
    touch(videos / "a.mp4")
    touch(videos / "sub" / "b.mp4")
    touch(tmp_path / "outside" / "c.mp4")
    os.symlink(tmp_path / "outside", videos / "cam")
    os.symlink(videos / "sub", videos / "again")  # sorts before sub: still listed as sub/b.mp4
    os.symlink("..", videos / "sub" / "up")
    os.symlink(tmp_path / "nowhere.mp4", videos / "gone.mp4")
    return videos


def test_links_to_folders_are_followed_and_each_real_folder_walked_once(linked_tree):
    """A link to a folder outside is followed; a second way into a folder (a link to a sibling) is
    not, and a folder inside the walked one is listed under its own path, not the link's."""
    listing = walk_folder(linked_tree)
    files = sorted(p.relative_to(linked_tree).as_posix() for p in listing.files)
    assert files == ["a.mp4", "cam/c.mp4", "sub/b.mp4"], files
    again = [n for n in listing.notes if n.startswith(f"{linked_tree / 'again'}: ")]
    assert again == [f"{linked_tree / 'again'}: not followed: this link leads to "
                     f"{linked_tree / 'sub'}, which is listed already"], listing.notes


def test_a_loop_of_folder_links_is_noted_once_and_not_followed(linked_tree):
    """sub/up -> .. leads back to a folder above it: one note names the link, and nothing under
    it is listed twice."""
    listing = walk_folder(linked_tree)
    loops = [n for n in listing.notes if n.endswith("(a loop of links)")]
    assert loops == [f"{linked_tree / 'sub' / 'up'}: not followed: this link leads back to "
                     f"{linked_tree.resolve()}, a folder above it (a loop of links)"], listing.notes
    assert len(listing.notes) == 2, listing.notes


def test_a_link_to_the_folder_itself_is_a_loop_noted_once(tmp_path):
    """videos/self -> . (the walked folder itself) is a loop too: one note, nothing listed twice."""
    videos = tmp_path / "videos"
    touch(videos / "a.mp4")
    os.symlink(".", videos / "self")
    listing = walk_folder(videos)
    assert listing.files == [videos / "a.mp4"], listing.files
    assert len(listing.notes) == 1 and listing.notes[0].endswith("(a loop of links)"), listing.notes


@pytest.mark.parametrize("target, why", [
    ("nowhere.mp4", "which does not exist (moved, deleted, or on a disk that is not mounted)"),
    ("itself.mp4", "a loop of links that never reaches a file"),
])
def test_a_dead_link_is_listed_and_named_with_where_it_points(tmp_path, target, why):
    """A link to nothing (or to itself) is listed as a dead link, and its message names the link,
    where it points and what to do."""
    videos = tmp_path / "videos"
    videos.mkdir()
    link = videos / ("itself.mp4" if target == "itself.mp4" else "gone.mp4")
    os.symlink(target, link)
    listing = walk_folder(videos)
    assert listing.dead_links == [link] and listing.files == [], listing
    message = listed_only_to_be_named(link)
    assert message == f"{link}: is a link to {target}, {why}; fix the link or remove it", message


def test_max_depth_1_lists_the_folder_and_its_subfolders_only(tmp_path):
    """With max_depth 1 (the reference folder), files two subfolders down are not listed."""
    refs = tmp_path / "refs"
    for name in ("A.jpg", "B/b.jpg", "B/deeper/c.jpg"):
        touch(refs / name)
    listing = walk_folder(refs, max_depth=1)
    assert sorted(p.relative_to(refs).as_posix() for p in listing.files) == ["A.jpg", "B/b.jpg"]


def test_a_file_reached_through_several_paths_is_listed_once_under_its_real_path(tmp_path, capsys):
    """A video, a link to it, a hard link to it and a link to its folder give one entry, its real
    path; each other path gets a note; a dead link is listed to be named."""
    videos = tmp_path / "videos"
    real = touch(videos / "talk.mp4")
    os.symlink(real, videos / "alias.mp4")
    os.link(real, videos / "talk_copy.mp4")
    os.symlink(videos, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere" / "talk.mp4", videos / "via_link.mp4")
    os.symlink(tmp_path / "nowhere.mp4", videos / "gone.mp4")
    listed = list_videos(videos)
    assert listed == sorted([real.resolve(), videos / "gone.mp4"]), listed
    notes = capsys.readouterr().out.splitlines()
    expected = [f"[*] {videos / name}: the same file as {real}: searched once, as {real.resolve()}"
                for name in ("alias.mp4", "talk_copy.mp4", "via_link.mp4")]
    assert sorted(notes) == expected, notes


def test_file_identity_is_the_same_for_every_path_to_a_file(tmp_path):
    """A file, a symbolic link and a hard link to it have one identity; another file has another."""
    real = touch(tmp_path / "a.mp4")
    os.symlink(real, tmp_path / "link.mp4")
    os.link(real, tmp_path / "hard.mp4")
    other = touch(tmp_path / "b.mp4")
    identities = {file_identity(p) for p in (real, tmp_path / "link.mp4", tmp_path / "hard.mp4")}
    assert len(identities) == 1 and file_identity(other) not in identities, identities


@pytest.mark.parametrize("names, expected", [
    (["a.mp4", "a.mkv", "sub/a.mp4", "b.mp4"], ["a_mp4", "a_mkv", "sub_a_mp4", "b"]),
    (["Talk.mp4", "talk.mkv"], ["Talk_mp4", "talk_mkv"]),  # one folder on Windows and macOS
    (["a.mp4", "a.mkv", "a_mp4.avi"], ["a_mp4", "a_mkv", "a_mp4_2"]),
    (["/cam1/x.mp4", "/cam2/x.mp4"], ["x_mp4", "x_mp4_2"]),  # outside the folder (links)
    (["x_mp4_2.mov", "/cam1/x.mp4", "/cam2/x.mp4"], ["x_mp4_2", "x_mp4", "x_mp4_3"]),
])
def test_output_names_are_unique_ignoring_case(names, expected):
    """Each video gets its own output folder: its stem, its path under the folder where stems
    clash (ignoring case), and _2, _3, ... where that is still taken; unique stems stay as they
    are."""
    root = Path("/videos")
    got = unique_output_names([root / n for n in names], root)
    assert got == expected, got
    assert len({n.casefold() for n in got}) == len(got), got
