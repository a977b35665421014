"""Output files (findpeople/outputs.py): a write that is interrupted or finds the disk full leaves
no .part file and no half-written file; one run at a time uses an output folder."""
from __future__ import annotations

from pathlib import Path

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


# One run per output folder (issue #11) ---------------------------------------------------------
HOLD_LOCK = ("import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
             "from findpeople.outputs import output_folder_lock\n"
             "with output_folder_lock(Path(sys.argv[2])):\n"
             "    print('held', flush=True); time.sleep(120)\n")


def hold_output_folder(folder: Path):
    """Start a process that holds the folder's lock (as a run does) and return it once it does."""
    import subprocess
    import sys
    from conftest import REPO
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(REPO), str(folder)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held", "the holder could not take the lock"
    return holder


def test_a_second_run_on_the_same_output_folder_is_refused_naming_the_first(tmp_path):
    """While a run holds OUTPUT_DIR, a second `python main.py` with the same --output stops at
    once with exit code 2 and names the first run's pid and start time; it writes nothing."""
    from conftest import REPO, link_all_refs, run_main, search_command, video_folder
    out = tmp_path / "out"
    out.mkdir()
    holder = hold_output_folder(out)
    try:
        before = sorted(p.name for p in out.iterdir())
        code, text = run_main(search_command(video_folder(tmp_path, "obama_whcd.mp4"),
                                             link_all_refs(tmp_path / "refs"), out), REPO)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2, text[-2000:]
    assert f"output folder {out} is in use by another run (pid {holder.pid} on " in text, text[-2000:]
    assert "started 20" in text and "choose another folder with --output" in text, text[-2000:]
    assert sorted(p.name for p in out.iterdir()) == before, "the refused run wrote into the folder"


def test_a_lock_left_by_a_run_killed_with_sigkill_does_not_block_the_next(tmp_path):
    """A run killed by kill -9 (or a power cut) leaves the lock file behind, but not the lock:
    the next run takes the folder at once, and then names itself as the holder."""
    import json
    import os
    from findpeople.errors import BadInput
    from findpeople.outputs import output_folder_lock
    holder = hold_output_folder(tmp_path)
    with pytest.raises(BadInput, match=f"pid {holder.pid} "):
        with output_folder_lock(tmp_path):
            pass
    holder.kill()
    holder.wait()
    assert (tmp_path / ".findpeople.lock").exists(), "the killed run's lock file should still be there"
    with output_folder_lock(tmp_path):
        saved = json.loads((tmp_path / ".findpeople.run.json").read_text())
        assert saved["pid"] == os.getpid(), saved
    assert not (tmp_path / ".findpeople.run.json").exists(), "the holder file outlived the run"


def test_a_killed_runs_holder_file_is_never_named_even_when_the_disk_is_full(tmp_path, monkeypatch):
    """A holder file left by a killed run goes as soon as the next run takes the lock, even when
    that run cannot write its own (a full disk): a refused third run never names a dead run."""
    import errno
    import json
    from findpeople.outputs import lock_holder, output_folder_lock
    (tmp_path / ".findpeople.run.json").write_text(json.dumps(
        {"pid": 99999, "host": "gone", "started": "2020-01-01 00:00:00"}))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("findpeople.outputs.write_bytes_atomic", disk_full)
    with output_folder_lock(tmp_path):
        assert "99999" not in lock_holder(tmp_path), lock_holder(tmp_path)
