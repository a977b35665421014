"""install_gpu.py and the pinned GPU sets (issue #15): one command ends with onnxruntime-gpu as the
only ONNX Runtime, safe to rerun, also after `pip install -r requirements.txt`; the pinned
versions belong together and resolve from PyPI; a GPU install without a GPU says what is missing.

Without a GPU and without gigabytes of CUDA wheels: the GPU sets are resolved by pip's dry run
(with fast-deps, which reads each wheel's metadata by HTTP range requests instead of downloading
it), and the documented install runs in a fresh virtual environment with --system-libs, which
leaves the CUDA, cuDNN and TensorRT wheels out. These tests need PyPI (CI has it) and take about
three minutes. TensorRT's PyPI packages cannot be resolved here: they download their wheels from
NVIDIA's own index, which this machine cannot reach (docs/gpu.md)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import install_gpu as installer
from conftest import MODEL_PACK, MODEL_ROOT, REPO, TEST_THRESHOLD, TESTDATA
from findpeople.gpulibs import linked_libraries

GPU_SETS = {cuda: installer.requirement_lines(path) for cuda, path in installer.GPU_REQUIREMENTS.items()}
PINNED_ORT = {cuda: re.search(r"onnxruntime-gpu\[cuda,cudnn\]==([\d.]+)", " ".join(lines)).group(1)
              for cuda, lines in GPU_SETS.items()}
WINDOWS = ["--only-binary=:all:", "--platform", "win_amd64", "--python-version", "3.13"]


def run(command: list, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, capturing its output as text."""
    return subprocess.run([str(part) for part in command], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


@pytest.mark.parametrize("system_libs, resolved, tensorrt", [
    (False, ["onnxruntime-gpu[cuda,cudnn]==1.31.1", "nvidia-cuda-runtime>=13,<14",
             "nvidia-cudnn-cu13>=9,<10"],
     ["tensorrt-cu13-libs==10.16.1.11"]),
    (True, ["onnxruntime-gpu==1.31.1"], []),
], ids=["pip-libraries", "system-libraries"])
def test_the_gpu_set_splits_into_what_pip_resolves_and_tensorrt(system_libs, resolved, tensorrt):
    """TensorRT's lines are installed after the dry run (their PyPI packages fetch the wheels while
    installing); --system-libs keeps onnxruntime-gpu alone, without its CUDA and cuDNN extras."""
    lines = ["onnxruntime-gpu[cuda,cudnn]==1.31.1", "nvidia-cuda-runtime>=13,<14",
             "nvidia-cudnn-cu13>=9,<10", "tensorrt-cu13-libs==10.16.1.11"]
    assert installer.split_gpu_set(lines, system_libs) == (resolved, tensorrt)


@pytest.mark.parametrize("installed, removed", [
    ({}, []),
    ({"onnxruntime-gpu": "1.31.1"}, []),
    ({"onnxruntime": "1.32.0"}, ["onnxruntime"]),
    ({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}, ["onnxruntime", "onnxruntime-gpu"]),
])
def test_the_cpu_build_goes_and_takes_the_gpu_build_with_it(installed, removed):
    """Both builds share one module folder: removing the CPU one deletes files of the GPU one, so
    both go (the GPU one is installed again); a GPU build alone stays."""
    assert installer.builds_to_remove(installed) == removed


def test_everything_pip_chose_is_installed_except_the_cpu_onnxruntime():
    """From pip's dry-run report, every package becomes an exact pin, except `onnxruntime`
    (any spelling), which insightface and requirements.txt ask for."""
    report = {"install": [{"metadata": {"name": name, "version": version}} for name, version in (
        ("onnxruntime-gpu", "1.31.1"), ("ONNXRuntime", "1.32.0"), ("insightface", "2.1"),
        ("nvidia-cudnn-cu13", "9.28.1.4"))]}
    assert installer.pins_to_install(report) == ["onnxruntime-gpu==1.31.1", "insightface==2.1",
                                                 "nvidia-cudnn-cu13==9.28.1.4"]
    assert installer.pins_to_install({"install": []}) == []


@pytest.mark.parametrize("platform, min_python, expected", [
    ("darwin", (3, 11), "built for Linux and Windows, not darwin: install the CPU build with "
                        "pip install -r requirements.txt"),
    ("linux", (99, 0), "need Python 99.0 or newer"),
    ("win32", (99, 0), "py -3.12 -m venv .venv"),
], ids=["macos", "old-python-linux", "old-python-windows"])
def test_where_no_gpu_build_exists_the_script_says_so_and_installs_nothing(
        monkeypatch, capsys, platform, min_python, expected):
    """macOS, or a Python older than the pinned builds need: exit code 2 with the fix, before
    pip is run at all."""
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(installer, "MIN_PYTHON", min_python)
    monkeypatch.setattr(installer, "pip", lambda *args, **kwargs: pytest.fail("pip was run"))
    assert installer.main([]) == 2
    assert expected in capsys.readouterr().out


GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("failing_step", ["install --dry-run", "download", "uninstall", "--no-index",
                                          "install --no-deps", None])
def test_nothing_is_uninstalled_before_the_gpu_builds_wheel_is_on_the_disk(monkeypatch,
                                                                           failing_step):
    """With the CPU build installed, pip runs in this order: resolve, download the GPU build,
    uninstall both builds, install the GPU build from that file (offline), the rest. A failure in
    the first two (the network) changes nothing; the uninstall is always followed by the offline
    install, so an environment is never left without an ONNX Runtime (review of issue #15)."""
    calls = []

    def fake_pip(args, capture=False):
        calls.append(" ".join(args))
        if failing_step and failing_step in calls[-1]:
            raise SystemExit(2)
        if args[:2] == ["install", "--dry-run"]:
            report = Path(args[args.index("--report") + 1])
            report.write_text(json.dumps({"install": [
                {"metadata": {"name": "onnxruntime", "version": "1.23.0"}},
                {"metadata": {"name": "nvidia-cudnn-cu13", "version": "9.1.0"}}]}))
    monkeypatch.setattr(installer, "pip", fake_pip)
    monkeypatch.setattr(installer, "ensure_pip", lambda: None)
    monkeypatch.setattr(installer, "unsupported_here", lambda: None)
    monkeypatch.setattr(installer, "installed_builds", lambda: {"onnxruntime": "1.23.0",
                                                                "onnxruntime-gpu": PINNED_ORT["13"]})
    monkeypatch.setattr(installer, "installed_state", lambda: {
        "builds": {"onnxruntime-gpu": PINNED_ORT["13"]}, "providers": installer.GPU_PROVIDERS,
        "error": None})
    monkeypatch.setattr(installer, "install_tensorrt", lambda lines: True)
    try:
        code = installer.main([])
    except SystemExit as stop:
        code = stop.code
    order = [next(k for k in ("install --dry-run", "download", "uninstall", "--no-index",
                              "install --no-deps") if k in call) for call in calls]
    expected = ["install --dry-run", "download", "uninstall", "--no-index", "install --no-deps"]
    assert order == expected[:len(order)], calls
    if "uninstall" in order:
        assert "--no-index" in order, f"uninstalled, then no offline install: {calls}"
    assert code == (0 if failing_step is None else 2), (code, calls)
    gpu = next(call for call in calls if "--no-index" in call) if "--no-index" in order else ""
    assert failing_step in ("install --dry-run", "download") or \
        gpu.endswith(f"onnxruntime-gpu=={PINNED_ORT['13']}"), calls


@pytest.mark.parametrize("state, problem", [
    ({"builds": {"onnxruntime-gpu": "1.31.1"}, "providers": GPU_PROVIDERS, "error": None}, None),
    ({"builds": {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}, "providers": GPU_PROVIDERS,
      "error": None}, "not onnxruntime-gpu alone"),
    ({"builds": {"onnxruntime-gpu": "1.31.1"}, "providers": ["CPUExecutionProvider"], "error": None},
     "does not list TensorrtExecutionProvider, CUDAExecutionProvider"),
    ({"builds": {"onnxruntime-gpu": "1.31.1"}, "providers": [], "error": "ImportError: x"},
     "cannot be imported: ImportError: x"),
], ids=["right", "two-builds", "cpu-providers", "broken"])
def test_the_finished_install_is_checked_for_one_build_and_the_gpu_providers(state, problem):
    """The script's last step fails the install that ends with two builds, with the CPU build's
    providers, or with an onnxruntime that cannot be imported."""
    problems = installer.check_result(state)
    assert (problems == []) if problem is None else any(problem in p for p in problems), problems


@pytest.mark.parametrize("cuda", sorted(GPU_SETS))
def test_each_gpu_set_pins_versions_that_belong_together(cuda):
    """One file per set pins onnxruntime-gpu with its CUDA and cuDNN extras, names the CUDA major
    the build is for, cuDNN 9, and TensorRT 10 (libnvinfer.so.10, what the provider links) built
    for that same CUDA major; docs/gpu.md's versions table shows the same."""
    text = " ".join(GPU_SETS[cuda])
    suffix = "" if cuda == "13" else f"-cu{cuda}"
    assert f"nvidia-cuda-runtime{suffix}>={cuda},<{int(cuda) + 1}" in text, text
    assert f"nvidia-cudnn-cu{cuda}>=9,<10" in text, text
    tensorrt = re.search(rf"tensorrt-cu{cuda}-libs==(10\.[\d.]+)", text)
    assert tensorrt, f"no TensorRT 10 for CUDA {cuda} pinned: {text}"
    row = next((line for line in (REPO / "docs" / "gpu.md").read_text(encoding="utf-8").splitlines()
                if line.startswith(f"| CUDA {cuda}, `{installer.GPU_REQUIREMENTS[cuda].name}`")), "")
    for expected in (PINNED_ORT[cuda], f"{cuda}.x", f"`tensorrt-cu{cuda}-libs` {tensorrt.group(1)}"):
        assert expected in row, f"docs/gpu.md's row for {installer.GPU_REQUIREMENTS[cuda].name} " \
                                f"lacks {expected!r}: {row!r}"


@pytest.mark.parametrize("cuda, platform", [("13", "linux"), ("13", "windows"), ("12", "linux"),
                                            ("12", "windows")])
def test_requirements_txt_and_each_gpu_set_resolve_together_from_pypi(cuda, platform, tmp_path):
    """pip resolves requirements.txt with the GPU set (TensorRT aside, see the module docstring)
    as one set, without conflicts, for Linux (this Python) and Windows (Python 3.13): the pinned
    onnxruntime-gpu and the CUDA and cuDNN wheels of its extras, of the set's CUDA major."""
    resolved, _ = installer.split_gpu_set(GPU_SETS[cuda], system_libs=False)
    report = tmp_path / "report.json"
    done = run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                "--use-feature=fast-deps", "--report", report, "-r", REPO / "requirements.txt",
                *resolved, *(WINDOWS if platform == "windows" else [])])
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    suffix = "" if cuda == "13" else f"-cu{cuda}"
    assert chosen.get("onnxruntime-gpu") == PINNED_ORT[cuda], chosen
    assert chosen.get(f"nvidia-cuda-runtime{suffix}", "").startswith(f"{cuda}."), chosen
    assert chosen.get(f"nvidia-cudnn-cu{cuda}", "").startswith("9."), chosen
    assert "insightface" in chosen and "onnxruntime" in chosen, chosen  # the CPU build pip wants


@pytest.mark.parametrize("cuda", sorted(GPU_SETS))
def test_the_pinned_tensorrt_is_published_on_pypi(cuda):
    """The pinned TensorRT version exists on PyPI (its package there fetches the wheel from
    NVIDIA's index while installing, so that is as far as this machine can check it)."""
    line = installer.split_gpu_set(GPU_SETS[cuda], system_libs=False)[1][0]
    name, version = line.split("==")
    done = run([sys.executable, "-m", "pip", "index", "versions", name])
    assert done.returncode == 0, done.stderr[-2000:]
    versions = re.search(r"Available versions: (.*)", done.stdout).group(1).split(", ")
    assert version in versions, f"{line}: PyPI has {versions}"


# ── the documented install, with the CUDA extras left out ──────────────────────────────────────
# The tests below share one virtual environment and run in file order; each leaves it as the
# install leaves it, except the last, which adds the CUDA runtime wheel.

def venv_python(venv: Path) -> Path:
    """Return the Python of a virtual environment (Linux or Windows layout)."""
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def install_state(python: Path) -> dict:
    """Return the ONNX Runtime builds and providers as a fresh interpreter of the venv sees them."""
    done = run([python, "-c", installer._CHECK_CODE])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gpu_venv(tmp_path_factory):
    """(python, first install's output): a virtual environment made the documented way,
    `python -m venv` then `install_gpu.py`, but with --system-libs (no CUDA, cuDNN or TensorRT
    wheels: gigabytes this machine has no GPU for)."""
    venv = tmp_path_factory.mktemp("gpu-install") / "venv"
    made = run([sys.executable, "-m", "venv", venv], timeout=300)
    assert made.returncode == 0, made.stderr
    first = run([venv_python(venv), REPO / "install_gpu.py", "--system-libs"], timeout=900)
    return venv_python(venv), first  # about 1.5 GB: left to pytest, which keeps its last 3 runs


def test_the_install_leaves_onnxruntime_gpu_alone_with_its_gpu_providers(gpu_venv):
    """After the documented command: onnxruntime-gpu at the pinned version is the only ONNX
    Runtime distribution, and onnxruntime lists the TensorRT and CUDA providers."""
    python, first = gpu_venv
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    state = install_state(python)
    assert state["builds"] == {"onnxruntime-gpu": PINNED_ORT["13"]}, state
    assert state["providers"][:2] == GPU_PROVIDERS[:2], state
    assert f"[ok] onnxruntime-gpu {PINNED_ORT['13']} is the only ONNX Runtime" in first.stdout


def test_running_it_again_changes_nothing(gpu_venv):
    """A second run finds everything installed: it removes and reinstalls nothing."""
    python, _ = gpu_venv
    module = Path(run([python, "-c", "import onnxruntime; print(onnxruntime.__file__)"]).stdout.strip())
    before = module.stat().st_mtime_ns
    again = run([python, REPO / "install_gpu.py", "--system-libs"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "already installed" in again.stdout and "uninstalling" not in again.stdout, again.stdout
    assert module.stat().st_mtime_ns == before, "onnxruntime was installed again"
    assert install_state(python)["builds"] == {"onnxruntime-gpu": PINNED_ORT["13"]}


def test_after_pip_install_requirements_txt_a_rerun_leaves_the_gpu_build_alone_again(gpu_venv):
    """`pip install -r requirements.txt` puts the CPU onnxruntime beside the GPU build (the
    problem this script exists for); running the script again removes both, installs the GPU
    build alone, and it imports with its GPU providers (no file of it lost)."""
    python, _ = gpu_venv
    plain = run([python, "-m", "pip", "install", "--quiet", "-r", REPO / "requirements.txt"])
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert set(install_state(python)["builds"]) == {"onnxruntime", "onnxruntime-gpu"}
    again = run([python, REPO / "install_gpu.py", "--system-libs"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = again.stdout
    assert "[*] uninstalling onnxruntime and onnxruntime-gpu:" in out, out
    assert out.index(f"downloading onnxruntime-gpu=={PINNED_ORT['13']} first") < \
        out.index("uninstalling onnxruntime and onnxruntime-gpu"), "uninstalled before the download"
    state = install_state(python)
    assert state["builds"] == {"onnxruntime-gpu": PINNED_ORT["13"]}, state
    assert state["providers"][:2] == GPU_PROVIDERS[:2], state


def test_the_tensorrt_and_cuda_pins_fit_what_the_installed_build_links(gpu_venv):
    """The pinned onnxruntime-gpu's TensorRT provider links the CUDA runtime of the set's CUDA
    major, cuDNN 9, and libnvinfer of the pinned TensorRT's major (read from the library itself)."""
    python, _ = gpu_venv
    code = "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))"
    folder = Path(run([python, "-c", code]).stdout.strip())
    library = folder / "capi" / ("onnxruntime_providers_tensorrt.dll" if sys.platform == "win32"
                                 else "libonnxruntime_providers_tensorrt.so")
    majors = {name: re.search(r"(\d+)(?:\.dll)?$", file).group(1)
              for name, file in linked_libraries(library, sys.platform).items()}
    tensorrt = installer.split_gpu_set(GPU_SETS["13"], system_libs=False)[1][0]
    assert tensorrt.startswith("tensorrt-cu13-libs==") and majors["CUDA runtime"] == "13", (majors, tensorrt)
    assert majors["TensorRT"] == tensorrt.split("==")[1].split(".")[0], (majors, tensorrt)
    assert majors["cuDNN"] == "9", majors


def check_output(python: Path, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """Run main.py --check with the venv's Python on the shared models, videos and photos."""
    return run([python, REPO / "main.py", "--check", "--model-root", MODEL_ROOT, "--model-pack",
                MODEL_PACK, "--videos", TESTDATA / "videos", "--refs", TESTDATA / "refs", *flags],
               cwd=tmp_path, timeout=300)


def test_check_names_what_is_missing_on_a_machine_without_a_gpu(gpu_venv, tmp_path):
    """--check of the GPU install here (no GPU, no cuDNN, no TensorRT): exit code 1 as documented;
    it names the one distribution, the missing GPU, each missing library, and the CUDA provider
    that cannot load; with --providers cpu nothing is missing (exit code 0)."""
    from findpeople.providers import visible_gpus
    if visible_gpus():
        pytest.skip("this machine has an NVIDIA GPU: the test is for one without (as CI is)")
    python, _ = gpu_venv
    done = check_output(python, tmp_path)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr[-3000:]
    for expected in (f"ONNX Runtime distributions: onnxruntime-gpu {PINNED_ORT['13']}",
                     "[!!] onnxruntime-gpu is installed, but no NVIDIA GPU was found",
                     "NVIDIA libraries (onnxruntime-gpu", "[--] cuDNN (libcudnn.so.9): not found",
                     "[--] TensorRT (libnvinfer.so.10): not found", "python install_gpu.py",
                     "[!!] provider CUDAExecutionProvider: cannot be loaded",
                     "[ok] provider CPUExecutionProvider: loads", "problem(s) found"):
        assert expected in out, f"{expected!r} missing from:\n{out}"
    cpu = check_output(python, tmp_path, "--providers", "cpu")
    assert cpu.returncode == 0 and "ready" in cpu.stdout, cpu.stdout + cpu.stderr[-3000:]


def test_a_run_with_providers_cpu_works_in_the_gpu_install(gpu_venv, tmp_path):
    """The GPU install on a machine without a GPU still searches with --providers cpu: it finds
    Barack Obama in the WHCD clip and exits 0."""
    python, _ = gpu_venv
    videos = tmp_path / "videos"
    videos.mkdir()
    os.symlink(TESTDATA / "videos" / "obama_whcd.mp4", videos / "obama_whcd.mp4")
    done = run([python, REPO / "main.py", "--providers", "cpu", "--model-root", MODEL_ROOT,
                "--model-pack", MODEL_PACK, "--custom-threshold", TEST_THRESHOLD, "--videos", videos,
                "--refs", TESTDATA / "refs", "--output", tmp_path / "out"], cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "Barack_Obama" in {d["name"] for d in results["videos"][0]["detections"]}, results["videos"]


def test_check_says_a_cuda_runtime_from_pip_is_from_pip(gpu_venv, tmp_path):
    """With the set's CUDA runtime wheel added (2.5 MB of the gigabytes), --check finds libcudart
    where onnxruntime.preload_dlls loaded it and names the pip package and its version."""
    python, _ = gpu_venv
    line = next(line for line in GPU_SETS["13"] if line.startswith("nvidia-cuda-runtime"))
    added = run([python, "-m", "pip", "install", "--quiet", line])
    assert added.returncode == 0, added.stderr[-3000:]
    version = install_version(python, "nvidia-cuda-runtime")
    out = check_output(python, tmp_path).stdout
    assert re.search(rf"\[ok\] CUDA runtime 13\.\d+ \(libcudart\.so\.13\) from pip "
                     rf"\(nvidia-cuda-runtime {re.escape(version)}\): .*site-packages", out), out


def install_version(python: Path, name: str) -> str:
    """Return the version of a distribution installed in the venv."""
    done = run([python, "-c", f"import importlib.metadata as m; print(m.version({name!r}))"])
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
