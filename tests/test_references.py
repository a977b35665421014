"""Section 1, References: labels from file names, largest face, bad photos reported and skipped."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import TESTDATA


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
    assert main_module.reference_label(root / relative, root) == label


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
    photos = main_module.list_reference_photos(mixed_refs)
    assert sorted(photos) == ["Barack_Obama", "Broken", "Michelle_Obama", "Nobody"]
    assert len(photos["Barack_Obama"]) == 2


def test_bad_photos_are_reported_by_name_and_the_rest_load(main_module, mixed_refs, cpu_models,
                                                         test_settings):
    """A photo with no face and a corrupt photo are named in the problems; the others are used."""
    references, problems, _ = main_module.load_references(mixed_refs, cpu_models, test_settings)
    names = {r.name: len(r.embeddings) for r in references}
    assert names == {"Barack_Obama": 2, "Michelle_Obama": 1}, names
    text = "\n".join(problems)
    assert "Nobody.png" in text and "no face" in text, text
    assert "Broken.jpg" in text and "not a readable image" in text, text


def test_a_person_matches_on_their_closest_photo(main_module, mixed_refs, cpu_models, test_settings):
    """With two Obama photos, his distance to each photo's own embedding is 0 via the closest one."""
    references, _, _ = main_module.load_references(mixed_refs, cpu_models, test_settings)
    embeddings, owners = main_module.reference_matrix(references)
    obama = references[[r.name for r in references].index("Barack_Obama")]
    distances = main_module.person_distances(obama.embeddings, embeddings, owners, len(references))
    own = [r.name for r in references].index("Barack_Obama")
    assert np.allclose(distances[:, own], 0.0, atol=1e-5), distances


def test_the_largest_face_of_a_group_photo_is_used(main_module, tmp_path, cpu_models, test_settings):
    """A photo with several faces yields the largest one, and says so."""
    import cv2
    big = main_module.read_image(TESTDATA / "refs" / "Barack_Obama.jpg")
    small = cv2.resize(main_module.read_image(TESTDATA / "refs" / "Michelle_Obama.jpg"), None,
                       fx=0.5, fy=0.5)
    canvas = np.zeros((max(big.shape[0], small.shape[0]), big.shape[1] + small.shape[1], 3), np.uint8)
    canvas[:big.shape[0], :big.shape[1]] = big
    canvas[:small.shape[0], big.shape[1]:] = small
    folder = tmp_path / "group"
    folder.mkdir()
    cv2.imwrite(str(folder / "Group.jpg"), canvas)
    references, problems, notes = main_module.load_references(folder, cpu_models, test_settings)
    alone, _, _ = main_module.load_references(TESTDATA / "refs", cpu_models, test_settings)
    obama = [r for r in alone if r.name == "Barack_Obama"][0].embeddings[0]
    assert problems == [], "a group photo is used, not skipped"
    assert any("faces found, using the largest" in n for n in notes), notes
    assert float(references[0].embeddings[0] @ obama) > 0.95


def test_no_usable_reference_is_a_clear_error(main_module, tmp_path, capsys):
    """When no photo has a face, main() exits 2 and says what to put in the folder."""
    refs, videos = tmp_path / "refs", tmp_path / "videos"
    refs.mkdir()
    videos.mkdir()
    write_blank(refs / "Nobody.jpg")
    os.symlink(TESTDATA / "videos" / "obama_whcd.mp4", videos / "obama_whcd.mp4")
    code = main_module.main(["--refs", str(refs), "--videos", str(videos), "--output",
                             str(tmp_path / "out"), "--model-root", str(TESTDATA.parent),
                             "--model-pack", "buffalo_sc_int8", "--providers", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, code
    assert "no usable reference photo" in err and str(refs) in err, err


def test_missing_reference_folder_names_it(main_module, tmp_path):
    """A reference folder that does not exist raises BadInput naming it."""
    with pytest.raises(main_module.BadInput, match="does_not_exist"):
        main_module.list_reference_photos(tmp_path / "does_not_exist")
