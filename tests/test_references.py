"""References (findpeople/references.py): labels from file names, largest face, bad photos
reported and skipped."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import TESTDATA
from findpeople.errors import BadInput
from findpeople.detect import detect_faces, face_size_px
from findpeople.references import (
    largest_face_index, list_reference_photos, load_references, read_image, reference_label,
    reference_matrix)
from findpeople.naming import person_distances


@pytest.mark.parametrize("relative, label", [
    ("Elon_Musk.jpg", "Elon_Musk"),
    ("Elon_Musk_2.jpg", "Elon_Musk"),
    ("Elon_Musk_17.png", "Elon_Musk"),
    ("Madonna.webp", "Madonna"),
    ("Barack_Obama/obama2.jpg", "Barack_Obama"),
    ("Barack_Obama/any_name_3.jpeg", "Barack_Obama"),
])
def test_label_is_the_stem_without_a_number_suffix_or_the_subfolder(main_module, relative, label):
    """Name.jpg and Name_2.jpg are one person; so is every photo in a subfolder Name/."""
    root = Path("/refs")
    assert reference_label(root / relative, root) == label


def write_blank(path: Path) -> None:
    import cv2
    cv2.imwrite(str(path), np.full((200, 200, 3), 128, np.uint8))


@pytest.fixture()
def mixed_refs(tmp_path):
    """Two Obama photos (file + subfolder), Michelle, a blank photo, a corrupt one, a text file."""
    folder = tmp_path / "refs"
    (folder / "Barack_Obama").mkdir(parents=True)
    os.symlink(TESTDATA / "refs" / "Barack_Obama.jpg", folder / "Barack_Obama.jpg")
    os.symlink(TESTDATA / "refs_alt" / "Barack_Obama" / "obama2.jpg", folder / "Barack_Obama" / "obama2.jpg")
    os.symlink(TESTDATA / "refs" / "Michelle_Obama.jpg", folder / "Michelle_Obama.jpg")
    write_blank(folder / "Nobody.png")
    (folder / "Broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("ignored")
    return folder


def test_photos_are_grouped_per_person(main_module, mixed_refs):
    """Only images count; a subfolder's photos join the file of the same name."""
    photos = list_reference_photos(mixed_refs)
    assert sorted(photos) == ["Barack_Obama", "Broken", "Michelle_Obama", "Nobody"]
    assert len(photos["Barack_Obama"]) == 2


def test_bad_photos_are_reported_by_name_and_the_rest_load(main_module, mixed_refs, cpu_models,
                                                         test_settings):
    """A photo with no face and a corrupt photo are named in the problems; the others are used."""
    references, problems, _ = load_references(mixed_refs, cpu_models, test_settings)
    names = {r.name: len(r.embeddings) for r in references}
    assert names == {"Barack_Obama": 2, "Michelle_Obama": 1}, names
    text = "\n".join(problems)
    assert "Nobody.png" in text and "no face" in text, text
    assert "Broken.jpg" in text and "not a readable image" in text, text


def test_a_person_matches_on_their_closest_photo(main_module, mixed_refs, cpu_models, test_settings):
    """With two Obama photos, his distance to each photo's own embedding is 0 via the closest one."""
    references, _, _ = load_references(mixed_refs, cpu_models, test_settings)
    embeddings, owners = reference_matrix(references)
    obama = references[[r.name for r in references].index("Barack_Obama")]
    distances = person_distances(obama.embeddings, embeddings, owners, len(references))
    own = [r.name for r in references].index("Barack_Obama")
    assert np.allclose(distances[:, own], 0.0, atol=1e-5), distances


def test_the_largest_face_of_a_group_photo_is_used(main_module, tmp_path, cpu_models, test_settings):
    """A photo with several faces yields the largest one, and says so."""
    import cv2
    big = read_image(TESTDATA / "refs" / "Barack_Obama.jpg")
    small = cv2.resize(read_image(TESTDATA / "refs" / "Michelle_Obama.jpg"), None,
                       fx=0.5, fy=0.5)
    canvas = np.zeros((max(big.shape[0], small.shape[0]), big.shape[1] + small.shape[1], 3), np.uint8)
    canvas[:big.shape[0], :big.shape[1]] = big
    canvas[:small.shape[0], big.shape[1]:] = small
    folder = tmp_path / "group"
    folder.mkdir()
    cv2.imwrite(str(folder / "Group.jpg"), canvas)
    references, problems, notes = load_references(folder, cpu_models, test_settings)
    alone, _, _ = load_references(TESTDATA / "refs", cpu_models, test_settings)
    obama = [r for r in alone if r.name == "Barack_Obama"][0].embeddings[0]
    assert problems == [], "a group photo is used, not skipped"
    assert any("faces found, using the largest" in n for n in notes), notes
    assert float(references[0].embeddings[0] @ obama) > 0.95


@pytest.mark.parametrize("contents, message", [
    ("a photo without a face", "no usable reference photo in {refs}: add a photo per person"),
    ("nothing", "no photo in {refs}: add one photo per person named after them"),
    ("only .heic photos", "no photo in {refs} in a format this can read: its 2 file(s) are in other "
                          "formats (.heic, e.g. IMG_0001.HEIC); convert them to .jpg or .png"),
])
def test_no_usable_reference_is_a_clear_error(main_module, tmp_path, capsys, contents, message):
    """A reference folder with no usable photo (none has a face, it is empty, or it holds only
    photos in formats that cannot be read, such as an iPhone's .heic): main() exits 2 and says
    what to put in the folder."""
    refs, videos = tmp_path / "refs", tmp_path / "videos"
    refs.mkdir()
    videos.mkdir()
    if contents == "a photo without a face":
        write_blank(refs / "Nobody.jpg")
    elif contents == "only .heic photos":
        for name in ("IMG_0001.HEIC", "IMG_0002.heic"):
            (refs / name).write_bytes(b"\x00\x00\x00\x18ftypheic")
    os.symlink(TESTDATA / "videos" / "obama_whcd.mp4", videos / "obama_whcd.mp4")
    code = main_module.main(["--refs", str(refs), "--videos", str(videos), "--output",
                             str(tmp_path / "out"), "--model-root", str(TESTDATA.parent),
                             "--model-pack", "buffalo_sc_int8", "--providers", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, code
    assert f"error: {message.format(refs=refs)}" in err, err


def test_missing_reference_folder_names_it(main_module, tmp_path):
    """A reference folder that does not exist raises BadInput naming it."""
    with pytest.raises(BadInput, match="does_not_exist"):
        list_reference_photos(tmp_path / "does_not_exist")


def face_px(main_module, models, settings, image) -> float:
    """The shorter side of the largest face's box in an image, in px."""
    boxes, _ = detect_faces(models, [image], settings)[0]
    return face_size_px(boxes[largest_face_index(boxes)])


def photo_with_face_of(main_module, models, settings, size_px: float) -> np.ndarray:
    """Obama's reference photo scaled so that his face is size_px, on a small grey canvas."""
    import cv2
    photo = read_image(TESTDATA / "refs" / "Barack_Obama.jpg")
    scale = size_px / face_px(main_module, models, settings, photo)
    small = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    canvas = np.full((max(160, small.shape[0]), max(160, small.shape[1]), 3), 120, np.uint8)
    canvas[:small.shape[0], :small.shape[1]] = small
    return canvas


@pytest.mark.parametrize("size_px, outcome", [(22, "skipped"), (44, "note"), (120, "clean")])
def test_tiny_faces_are_skipped_and_small_ones_warned(main_module, tmp_path, cpu_models,
                                                      test_settings, size_px, outcome):
    """A reference face below MIN_FACE_SIZE (32 px) is skipped with a message naming the photo;
    one below 56 px is used with a warning; a large one is used silently."""
    import cv2
    folder = tmp_path / "refs"
    folder.mkdir()
    image = photo_with_face_of(main_module, cpu_models, test_settings, size_px)
    cv2.imwrite(str(folder / "Barack_Obama.png"), image)
    measured = face_px(main_module, cpu_models, test_settings, image)
    references, problems, notes = load_references(folder, cpu_models, test_settings)
    if outcome == "skipped":
        assert measured < 32 and references == [], (measured, references)
        assert len(problems) == 1 and "Barack_Obama.png" in problems[0] and "too small" in problems[0], problems
    elif outcome == "note":
        assert 32 <= measured < 56 and len(references) == 1 and problems == [], (measured, problems)
        assert any("Barack_Obama.png" in n and "the face is small" in n for n in notes), notes
    else:
        assert measured >= 56 and len(references) == 1 and problems == [] and notes == [], (measured, notes)


def test_label_spellings_that_differ_only_in_case_or_separators_are_one_person(
        main_module, tmp_path, cpu_models, test_settings):
    """Barack_Obama.jpg and 'barack obama_2.jpg' are one person (the first spelling), with a note."""
    folder = tmp_path / "refs"
    folder.mkdir()
    os.symlink(TESTDATA / "refs" / "Barack_Obama.jpg", folder / "Barack_Obama.jpg")
    os.symlink(TESTDATA / "refs_alt" / "Barack_Obama" / "obama2.jpg", folder / "barack obama_2.jpg")
    references, problems, notes = load_references(folder, cpu_models, test_settings)
    assert [(r.name, len(r.photos)) for r in references] == [("Barack_Obama", 2)], references
    assert problems == [] and any("differ only in case" in n and "'barack obama'" in n for n in notes), notes


def test_unsupported_files_are_named_and_system_files_ignored(main_module, tmp_path, cpu_models,
                                                              test_settings):
    """A .heic or .gif photo is reported by name with the fix (convert to .jpg); .DS_Store and
    Thumbs.db are not photos and are passed over silently; .bmp is read."""
    import cv2
    folder = tmp_path / "refs"
    folder.mkdir()
    (folder / "Kit_Harington.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (folder / "Rose_Leslie.gif").write_bytes(b"GIF89a")
    (folder / ".DS_Store").write_bytes(b"\x00Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf")
    cv2.imwrite(str(folder / "Michelle_Obama.bmp"), read_image(TESTDATA / "refs" / "Michelle_Obama.jpg"))
    references, problems, _ = load_references(folder, cpu_models, test_settings)
    assert [r.name for r in references] == ["Michelle_Obama"], references
    assert len(problems) == 2, problems
    for name, suffix in (("Kit_Harington.heic", ".heic"), ("Rose_Leslie.gif", ".gif")):
        line = next(p for p in problems if name in p)
        assert f"not a supported photo format ({suffix})" in line and "convert it to .jpg" in line, line


def test_the_same_face_under_two_names_is_refused_for_the_second(main_module, tmp_path, cpu_models,
                                                                 test_settings):
    """The same photo saved as Barack_Obama.jpg and President.jpg could never be named (no match
    would beat the other by MATCH_MARGIN): the second is skipped with a message naming both."""
    folder = tmp_path / "refs"
    folder.mkdir()
    os.symlink(TESTDATA / "refs" / "Barack_Obama.jpg", folder / "Barack_Obama.jpg")
    os.symlink(TESTDATA / "refs" / "Barack_Obama.jpg", folder / "President.jpg")
    os.symlink(TESTDATA / "refs" / "Michelle_Obama.jpg", folder / "Michelle_Obama.jpg")
    references, problems, _ = load_references(folder, cpu_models, test_settings)
    assert [r.name for r in references] == ["Barack_Obama", "Michelle_Obama"], references
    assert len(problems) == 1 and "President.jpg" in problems[0] and "Barack_Obama.jpg" in problems[0], problems
    assert "same face" in problems[0], problems


def test_links_are_followed_each_photo_used_once_a_loop_noted_once_and_dead_links_named(
        main_module, tmp_path, cpu_models, test_settings):
    """A link to a person's folder elsewhere is followed (its photos are that person's); the same
    photo linked twice under one name is used once, with a note; a link back to the folder itself
    (a loop) is noted once and not followed; a dead link is skipped, named, with where it pointed
    (issue #11)."""
    refs = tmp_path / "refs"
    refs.mkdir()
    os.symlink(TESTDATA / "refs_alt" / "Barack_Obama", refs / "Barack_Obama")
    os.symlink(TESTDATA / "refs" / "Michelle_Obama.jpg", refs / "Michelle_Obama.jpg")
    os.symlink(TESTDATA / "refs" / "Michelle_Obama.jpg", refs / "Michelle_Obama_2.jpg")
    os.symlink(".", refs / "everyone")
    os.symlink(tmp_path / "moved.jpg", refs / "Kit_Harington.jpg")
    references, problems, notes = load_references(refs, cpu_models, test_settings)
    used = {r.name: [Path(p).relative_to(refs).as_posix() for p in r.photos] for r in references}
    assert used == {"Barack_Obama": ["Barack_Obama/obama2.jpg"],
                    "Michelle_Obama": ["Michelle_Obama.jpg"]}, used
    assert problems == [f"{refs / 'Kit_Harington.jpg'}: is a link to {tmp_path / 'moved.jpg'}, "
                        f"which does not exist (moved, deleted, or on a disk that is not mounted); "
                        f"fix the link or remove it (skipped)"], problems
    mine = [n for n in notes
            if n.startswith((f"{refs / 'everyone'}: ", f"{refs / 'Michelle_Obama_2.jpg'}: "))]
    assert mine == [f"{refs / 'everyone'}: not followed: this link leads back to {refs.resolve()}, "
                    f"a folder above it (a loop of links)",
                    f"{refs / 'Michelle_Obama_2.jpg'}: the same file as {refs / 'Michelle_Obama.jpg'}: "
                    f"used once for Michelle_Obama"], notes
