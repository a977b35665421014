"""bench/gpu_check.sh: the one-command GPU check also runs where a GPU, onnxruntime-gpu, TensorRT
and ffmpeg are missing, saying what it could not check instead of failing (issue #4, item 6)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_gpu_check_runs_without_gpu_tensorrt_or_ffmpeg(tmp_path):
    """On this CPU machine, with no ffmpeg on PATH: exit code 0, each missing piece listed as not
    checked, and the checks it can run (CPU provider, batched and device-path detections equal
    single-frame ones, frames/s at batch 1, 8 and 32) reported."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("bash", "dirname"):
        os.symlink(subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip(),
                   tools / tool)
    env = {**os.environ, "PATH": str(tools), "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([str(tools / "bash"), str(REPO / "bench" / "gpu_check.sh"), "--quick"],
                          capture_output=True, text=True, timeout=600, env=env)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    for expected in ("[--] ffmpeg on PATH: none", "[--] TensorRT: not installed",
                     "[--] TensorRT engine build and reuse: TensorRT does not load here",
                     "[--] CUDAExecutionProvider: not in this build", "[ok] CPUExecutionProvider: loads",
                     "[ok] CPUExecutionProvider: batched detections equal single-frame ones",
                     "[ok] CPUExecutionProvider: device path detections equal single-frame ones",
                     "batch  1:", "batch  8:", "batch 32:", "== 0 failed"):
        assert expected in out, f"{expected!r} missing from:\n{out[-3000:]}"
    faces = int(out.split("single-frame ones (")[1].split(" faces")[0])
    assert faces >= 8, f"the equality check saw only {faces} faces"


def load_gpu_check():
    """bench/gpu_check.py as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tensorrt_missing_is_not_checked_but_a_failing_cuda_is_a_failure(monkeypatch, capsys):
    """On a GPU machine with onnxruntime-gpu but without TensorRT (it lists TensorRT anyway),
    TensorRT is 'not checked' ([--]); a CUDA provider whose libraries do not load fails ([!!]).
    Goes through findpeople.providers.working_providers, with the libraries' load errors made up."""
    import onnxruntime as ort
    gpu_check = load_gpu_check()
    main = gpu_check.main
    errors = {"TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so cannot be loaded: "
                                           "libnvinfer.so.10: cannot open shared object file",
              "CUDAExecutionProvider": None}
    monkeypatch.setattr(ort, "get_available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr("findpeople.providers.provider_library_error", lambda provider: errors.get(provider))
    monkeypatch.setattr("findpeople.providers.tensorrt_version", lambda: None)
    detector = Path(main.__file__).parent.parent / "shared" / "models" / "buffalo_sc_int8" / "det_500m.onnx"
    report = gpu_check.Report()
    gpu_check.providers(report, detector)
    out = capsys.readouterr().out
    assert "[--] TensorrtExecutionProvider: cannot be loaded" in out and "libnvinfer" in out, out
    assert "[!!] CUDAExecutionProvider" in out, out  # listed (as faked), but no CUDA here: it fails
    assert report.failed == 1, out
    errors["CUDAExecutionProvider"] = "libonnxruntime_providers_cuda.so cannot be loaded: libcudnn.so.9: x"
    report = gpu_check.Report()
    gpu_check.providers(report, detector)
    out = capsys.readouterr().out
    assert "[!!] CUDAExecutionProvider: cannot be loaded" in out and "libcudnn.so.9" in out, out
    assert report.failed == 1, out
