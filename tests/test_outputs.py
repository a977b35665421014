"""Output files (findpeople/outputs.py): a write that is interrupted or finds the disk full leaves
no .part file and no half-written file."""
from __future__ import annotations

import pytest

from findpeople.outputs import write_bytes_atomic


def test_an_interrupted_write_leaves_no_part(main_module, tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) in the middle of a write: the .part is removed too, the previous
    file stays, and the interruption goes on up (issue #5)."""
    import os
    path = tmp_path / "results.json"
    path.write_text("previous")

    def interrupted(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_write_to_a_really_full_device_leaves_no_part(main_module, tmp_path):
    """The same with the kernel's own ENOSPC: the .part file is /dev/full (always full)."""
    import errno
    import os
    path = tmp_path / "index.html"
    path.write_text("previous")
    os.symlink("/dev/full", tmp_path / "index.html.part")
    with pytest.raises(OSError) as raised:
        write_bytes_atomic(path, b"x" * 100_000)
    assert raised.value.errno == errno.ENOSPC, raised.value
    assert "No space left on device" in str(raised.value) and str(path) in str(raised.value)
    assert path.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]
