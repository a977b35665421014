"""Shared fixtures: the real test media and models in ../shared, read in place (never copied)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TESTDATA = SHARED / "testdata"
MODEL_ROOT = SHARED  # insightface layout: <root>/models/<pack>/
MODEL_PACK = "buffalo_sc_int8"
TEST_THRESHOLD = 0.70  # cosine distance fitting buffalo_sc_int8 (same person ~0.5-0.6, others >= 0.74)
VIDEOS = sorted((TESTDATA / "videos").glob("*.mp4"))

sys.path.insert(0, str(REPO))


def pytest_configure(config):
    if not TESTDATA.is_dir():
        raise pytest.UsageError(f"{TESTDATA} is missing: the tests read ../shared beside the checkout")


@pytest.fixture(scope="session")
def main_module():
    """The main module, imported once (importing it does nothing)."""
    import main
    return main


@pytest.fixture(scope="session")
def ffmpeg_exe(main_module):
    """The ffmpeg main.py would use (ffmpeg/ -> PATH -> imageio-ffmpeg)."""
    exe = main_module.find_ffmpeg(str(REPO / "ffmpeg"))
    assert exe, "no ffmpeg found: pip install imageio-ffmpeg"
    return exe


@pytest.fixture(scope="session")
def test_settings(main_module):
    """Settings for the shared models on the CPU, as a Settings record."""
    return main_module.load_settings([
        "--model-root", str(MODEL_ROOT), "--model-pack", MODEL_PACK, "--providers", "cpu",
        "--custom-threshold", str(TEST_THRESHOLD)])


@pytest.fixture(scope="session")
def cpu_models(main_module, test_settings):
    """The buffalo_sc_int8 detector and recognizer on the CPU provider."""
    return main_module.load_face_models(test_settings, "cpu", 1)


def link_all_refs(folder: Path) -> Path:
    """Make folder hold links to every photo in refs/ and refs_distractors/ (the files stay in place)."""
    folder.mkdir(parents=True)
    for sub in ("refs", "refs_distractors"):
        for photo in (TESTDATA / sub).glob("*.jpg"):
            os.symlink(photo, folder / photo.name)
    return folder


@pytest.fixture()
def all_refs_dir(tmp_path):
    """A folder of links to every photo in refs/ and refs_distractors/."""
    return link_all_refs(tmp_path / "refs")
