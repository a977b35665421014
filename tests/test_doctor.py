"""Check and demo (findpeople/doctor.py): --check reports and changes nothing; --demo runs a
full search."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


from conftest import MODEL_PACK, MODEL_ROOT, REPO, TEST_THRESHOLD, TESTDATA
from findpeople.providers import working_providers
from findpeople.doctor import check_lines

MODEL_FLAGS = ["--model-root", str(MODEL_ROOT), "--model-pack", MODEL_PACK, "--providers", "cpu",
               "--custom-threshold", str(TEST_THRESHOLD)]


def run_main(args: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def tree(folder: Path) -> dict:
    """Every file and folder below folder with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


def test_check_reports_what_would_run_and_changes_nothing(tmp_path, all_refs_dir):
    """--check lists versions, providers that load, the model pack, ffmpeg, the videos and the
    photos, exits 0 when all is ready, and writes nothing."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for clip in (TESTDATA / "videos").glob("*.mp4"):
        os.symlink(clip, videos / clip.name)
    before = tree(tmp_path)
    done = run_main(["--check", *MODEL_FLAGS, "--videos", str(videos), "--refs", str(all_refs_dir)],
                    cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for expected in ("Python 3", "onnxruntime: 1.", "insightface: ", "provider CPUExecutionProvider: loads",
                     "model pack: ", "det_500m.onnx", "ffmpeg: ", "obama_whcd.mp4: 844x614",
                     "3 usable", "6 people", "ready"):
        assert expected in out, f"{expected!r} missing from:\n{out}"
    assert tree(tmp_path) == before, "--check changed files"


def test_check_names_what_is_missing_and_suggests_the_demo(tmp_path):
    """With no model pack and empty folders --check exits 1, names the folder the pack belongs in
    and points to --demo; it does not download anything."""
    (tmp_path / "in_video").mkdir()
    (tmp_path / "samples_jpg").mkdir()
    done = run_main(["--check", "--model-root", str(tmp_path / "models_root")], cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert str(tmp_path / "models_root" / "models" / "buffalo_l") in done.stdout, done.stdout
    assert "python main.py --demo" in done.stdout
    assert not (tmp_path / "models_root").exists(), "--check must not download"


def test_a_provider_that_cannot_load_is_reported_with_the_reason(main_module, monkeypatch):
    """working_providers checks each provider alone: CUDA listed (as with onnxruntime-gpu) but
    its library missing on this CPU machine is reported with that reason; the CPU loads."""
    import onnxruntime as ort
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    verdicts = working_providers(MODEL_ROOT / "models" / MODEL_PACK / "det_500m.onnx")
    assert verdicts["CPUExecutionProvider"] == "loads", verdicts
    assert verdicts["CUDAExecutionProvider"] != "loads", verdicts
    assert "libonnxruntime_providers_cuda.so is missing" in verdicts["CUDAExecutionProvider"], verdicts


def test_demo_runs_the_whole_search_and_finds_the_astronaut(tmp_path):
    """--demo builds a video and a reference photo from scikit-image's public-domain pictures and
    finds the astronaut in the seconds she is on screen (2-6 s and 8-10 s), nowhere else."""
    done = run_main(["--demo", *MODEL_FLAGS], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    demo_root = Path(next(line.split()[2] for line in done.stdout.splitlines()
                          if line.startswith("[*] demo: ")))
    try:
        results = json.loads((demo_root / "found_fragments_colored_" / "results.json").read_text())
        detections = results["videos"][0]["detections"]
        times = [d["time"] for d in detections if d["name"] == "Eileen_Collins"]
        assert times, "the astronaut was not found"
        assert all(2.0 <= t < 6.0 or 8.0 <= t < 10.0 for t in times), sorted(times)
        assert any(t < 6.0 for t in times) and any(t >= 8.0 for t in times), sorted(times)
        assert (demo_root / "found_fragments_colored_" / "index.html").is_file()
    finally:
        import shutil
        shutil.rmtree(demo_root, ignore_errors=True)


def test_empty_folders_say_how_to_start(tmp_path):
    """With no videos, the run exits 2 and says where to put videos and photos, and about --demo."""
    (tmp_path / "in_video").mkdir()
    (tmp_path / "samples_jpg").mkdir()
    done = run_main(MODEL_FLAGS, cwd=tmp_path)
    assert done.returncode == 2
    assert "in_video" in done.stderr and "samples_jpg" in done.stderr and "--demo" in done.stderr, done.stderr


def test_check_reports_a_broken_onnxruntime_instead_of_crashing(tmp_path, all_refs_dir):
    """With an onnxruntime that cannot be imported, --check still prints its report, names the
    problem and exits 1 (a broken install is what it is for)."""
    fake = tmp_path / "fake_site" / "onnxruntime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libonnxruntime.so: cannot open shared object file')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    done = subprocess.run([sys.executable, str(REPO / "main.py"), "--check", *MODEL_FLAGS,
                           "--videos", str(TESTDATA / "videos"), "--refs", str(all_refs_dir)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot be opened (ImportError" in done.stdout and "libonnxruntime" in done.stdout, done.stdout
    assert "obama_whcd.mp4" in done.stdout, "the rest of the report is still printed"


def test_check_counts_a_cuda_that_does_not_load_but_not_a_missing_tensorrt(main_module, monkeypatch):
    """--check with onnxruntime-gpu's provider list on a machine whose CUDA libraries do not load:
    CUDA is a problem ([!!]); TensorRT, not installed, is optional ([--]) with --providers auto."""
    import onnxruntime as ort
    monkeypatch.setattr(ort, "get_available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr("findpeople.providers.tensorrt_version", lambda: None)
    settings = main_module.load_settings(MODEL_FLAGS[:4])
    lines, problems = check_lines(settings)
    text = "\n".join(lines)
    assert "[!!] provider CUDAExecutionProvider: cannot be loaded" in text, text
    assert "[--] provider TensorrtExecutionProvider" in text, text
    assert problems == 1, text


def test_check_with_providers_cpu_counts_no_gpu_provider(main_module, monkeypatch):
    """--check --providers cpu: a GPU provider that does not load is listed ([--]), not counted,
    since the run will not use it (issue #15: a GPU install on a machine without a GPU)."""
    import onnxruntime as ort
    monkeypatch.setattr(ort, "get_available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    settings = main_module.load_settings([*MODEL_FLAGS[:4], "--providers", "cpu"])
    lines, problems = check_lines(settings)
    text = "\n".join(lines)
    assert "[--] provider CUDAExecutionProvider: cannot be loaded" in text, text
    assert "[ok] provider CPUExecutionProvider: loads" in text, text
    assert problems == 0, text


def test_check_of_a_gpu_install_without_a_gpu_names_the_build_the_missing_gpu_and_each_library(
        main_module, monkeypatch):
    """With onnxruntime-gpu alone installed and no GPU found, --check names the one ONNX Runtime
    distribution, counts the missing GPU as a problem (with the fix), and lists each NVIDIA library
    the build links as found ([ok], from pip or the system) or not ([--]: the provider lines count
    what that breaks); with --providers cpu the GPU is no problem. Issue #15."""
    versions = {"onnxruntime-gpu": "1.31.1", "insightface": "2.1"}
    monkeypatch.setattr("findpeople.doctor.package_version", versions.get)
    monkeypatch.setattr("findpeople.providers.package_version", versions.get)
    monkeypatch.setattr("findpeople.doctor.visible_gpus", lambda: [])
    monkeypatch.setattr("findpeople.doctor.working_providers", lambda detector: {
        "CPUExecutionProvider": "loads"})
    loaded = []
    monkeypatch.setattr("findpeople.doctor.load_nvidia_libraries", loaded.append)
    monkeypatch.setattr("findpeople.doctor.library_lines", lambda library: [
        (True, "CUDA runtime 13.0 (libcudart.so.13) from pip (nvidia-cuda-runtime 13.0.96): /x"),
        (False, "cuDNN (libcudnn.so.9): not found (libcudnn.so.9: cannot open shared object file)")])
    lines, problems = check_lines(main_module.load_settings(MODEL_FLAGS[:4]))
    text = "\n".join(lines)
    assert "ONNX Runtime distributions: onnxruntime-gpu 1.31.1" in text, text
    assert "[!!] onnxruntime-gpu is installed, but no NVIDIA GPU was found" in text, text
    assert "--providers cpu" in text and "docs/gpu.md" in text, text
    assert "  [ok] CUDA runtime 13.0 (libcudart.so.13) from pip (nvidia-cuda-runtime 13.0.96)" in text, text
    assert "  [--] cuDNN (libcudnn.so.9): not found" in text and "python install_gpu.py" in text, text
    assert problems == 1 and loaded, text
    cpu_lines, cpu_problems = check_lines(main_module.load_settings([*MODEL_FLAGS[:4], "--providers", "cpu"]))
    assert cpu_problems == 0 and "no NVIDIA GPU" not in "\n".join(cpu_lines), cpu_lines
