"""NVIDIA libraries (findpeople/gpulibs.py): TensorRT's libraries found in its pip wheel's folder
and loaded before the sessions, without LD_LIBRARY_PATH; where each CUDA, cuDNN and TensorRT
library comes from (pip or the system) and its version (issue #15). There is no TensorRT here: a
fake `tensorrt_libs` package holds copies of a real shared library under TensorRT's names, and
what gets loaded runs in a fresh interpreter, so this one never maps the fakes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from findpeople.gpulibs import (
    linked_libraries, pip_distribution_of, preload_tensorrt, tensorrt_library_patterns,
    tensorrt_wheel_folder, version_text)

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps (Linux)")
TRT_NAMES = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")
OTHER_NAMES = ("libnvinfer_lean.so.10", "libnvinfer_builder_resource.so.10.16.1",
               "libnvinfer_dispatch.so.10", "libnvonnxparser_static.a")


def a_real_shared_library() -> Path:
    """Return a shared library file that any Linux Python can load: its _ctypes extension."""
    import _ctypes
    return Path(_ctypes.__file__)


def fake_tensorrt_wheel(site: Path, names=TRT_NAMES, others=OTHER_NAMES, content=None) -> Path:
    """Make site/tensorrt_libs/ as TensorRT's pip wheel lays it out, with a .dist-info whose
    RECORD lists its files (as pip writes it); return the package folder."""
    package = site / "tensorrt_libs"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in (*names, *others):
        if content is None:
            shutil.copyfile(a_real_shared_library(), package / name)
        else:
            (package / name).write_text(content)
    info = site / "tensorrt_cu13_libs-10.16.1.11.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorrt-cu13-libs\nVersion: 10.16.1.11\n")
    (info / "RECORD").write_text("".join(f"tensorrt_libs/{p.name},,\n" for p in package.iterdir()))
    return package


def run_fresh(site: Path, code: str) -> dict:
    """Run code in a fresh interpreter with site on sys.path; return the JSON it prints last."""
    prelude = f"import json, sys\nsys.path[:0] = [{str(site)!r}, {str(REPO)!r}]\n"
    done = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("platform, expected", [
    ("linux", ("libnvinfer.so.[0-9]*", "libnvinfer_plugin.so.[0-9]*", "libnvonnxparser.so.[0-9]*")),
    ("win32", ("nvinfer_[0-9]*.dll", "nvinfer_plugin_[0-9]*.dll", "nvonnxparser_[0-9]*.dll")),
])
def test_tensorrt_libraries_load_libnvinfer_first_then_its_plugin_and_parser(platform, expected):
    """The plugin and the ONNX parser link libnvinfer, so it is loaded first, on both systems."""
    assert tensorrt_library_patterns(platform) == expected


def test_the_tensorrt_wheel_folder_is_found_on_sys_path_without_importing_it(tmp_path, monkeypatch):
    """tensorrt_libs is found where pip put it (any sys.path entry), and not imported."""
    if tensorrt_wheel_folder() is not None:
        pytest.skip("a real TensorRT wheel is installed here (a GPU install): CI has none")
    package = fake_tensorrt_wheel(tmp_path / "site")
    (package / "__init__.py").write_text("raise ImportError('importing it is not needed')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert tensorrt_wheel_folder() == package
    assert "tensorrt_libs" not in sys.modules


def test_without_the_tensorrt_wheel_nothing_is_loaded_and_nothing_is_wrong(tmp_path):
    """No wheel installed (as in CI), or an empty folder: nothing to load and no problem (the
    TensorRT provider's own check says that TensorRT is missing)."""
    if tensorrt_wheel_folder() is not None:
        pytest.skip("a real TensorRT wheel is installed here (a GPU install): CI has none")
    assert preload_tensorrt() == ([], None)
    (tmp_path / "tensorrt_libs").mkdir()
    assert preload_tensorrt(tmp_path / "tensorrt_libs") == ([], None)


@linux_only
def test_the_wheels_tensorrt_libraries_are_loaded_into_the_process_in_order(tmp_path):
    """With the wheel on sys.path (not on LD_LIBRARY_PATH), preload_tensorrt maps exactly
    libnvinfer, its plugin and the ONNX parser into the process, in that order, and no other
    library of the folder."""
    package = fake_tensorrt_wheel(tmp_path / "site")
    result = run_fresh(tmp_path / "site", (
        "from pathlib import Path\n"
        "from findpeople.gpulibs import preload_tensorrt\n"
        "loaded, problem = preload_tensorrt()\n"
        "maps = Path('/proc/self/maps').read_text()\n"
        f"mapped = sorted({{line.split()[-1] for line in maps.splitlines() if {str(package)!r} in line}})\n"
        "print(json.dumps({'loaded': [str(p) for p in loaded], 'problem': problem, 'mapped': mapped}))\n"))
    assert result["problem"] is None, result
    assert result["loaded"] == [str(package / name) for name in TRT_NAMES], result
    assert result["mapped"] == sorted(str(package / name) for name in TRT_NAMES), result


def test_a_tensorrt_library_that_cannot_load_is_named_with_the_fix(tmp_path):
    """A damaged library file in the wheel: the problem names the file, the loader's error and
    the fix; nothing after it is loaded."""
    package = fake_tensorrt_wheel(tmp_path / "site", others=(), content="not a shared library")
    loaded, problem = preload_tensorrt(package)
    assert loaded == []
    assert problem and str(package / TRT_NAMES[0]) in problem and "python install_gpu.py" in problem, problem


@pytest.mark.parametrize("platform, text, expected", [
    ("linux", b"\0libcublas.so.13\0libnvinfer.so.10\0libnvinfer_plugin.so.10\0libcudart.so.13\0libcudnn.so.9\0",
     {"CUDA runtime": "libcudart.so.13", "cuBLAS": "libcublas.so.13", "cuDNN": "libcudnn.so.9",
      "TensorRT": "libnvinfer.so.10"}),
    ("linux", b"\0libnvinfer.so.10\0libcudart.so.12\0", {"CUDA runtime": "libcudart.so.12",
                                                        "TensorRT": "libnvinfer.so.10"}),
    ("win32", b"\0cudart64_13.dll\0CUBLAS64_13.dll\0nvinfer_10.dll\0nvinfer_plugin_10.dll\0cudnn64_9.dll\0",
     {"CUDA runtime": "cudart64_13.dll", "cuBLAS": "CUBLAS64_13.dll", "cuDNN": "cudnn64_9.dll",
      "TensorRT": "nvinfer_10.dll"}),
], ids=["linux-cuda13", "linux-some", "windows"])
def test_the_libraries_a_provider_links_are_read_from_its_file(tmp_path, platform, text, expected):
    """Which CUDA runtime, cuBLAS, cuDNN and TensorRT majors an onnxruntime-gpu build needs is
    read from its TensorRT provider's library (libnvinfer_plugin is not libnvinfer)."""
    library = tmp_path / "libonnxruntime_providers_tensorrt.so"
    library.write_bytes(b"\x7fELF" + text)
    assert linked_libraries(library, platform) == expected
    assert linked_libraries(tmp_path / "missing.so", platform) == {}


@pytest.mark.parametrize("number, expected", [
    (92801, "9.28.1"), (90000, "9.0.0"), (101601, "10.16.1"), (100000, "10.0.0"), (8907, "8.9.7"),
    (8601, "8.6.1")])
def test_cudnn_and_tensorrt_version_numbers_read_as_text(number, expected):
    """cuDNN 9 and TensorRT 10 write major x 10000 + minor x 100 + patch; cuDNN 8 and TensorRT 8
    major x 1000 + minor x 100 + patch."""
    assert version_text(number) == expected


def test_a_library_from_a_pip_wheel_is_named_with_its_package_and_others_are_the_systems(tmp_path, monkeypatch):
    """A file some installed distribution's RECORD lists comes from pip (that package and its
    version); a file none lists is the system's."""
    package = fake_tensorrt_wheel(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert pip_distribution_of(package / "libnvinfer.so.10") == ("tensorrt-cu13-libs", "10.16.1.11")
    stray = tmp_path / "libnvinfer.so.10"
    stray.write_text("")
    assert pip_distribution_of(stray) is None


@linux_only
def test_check_lines_say_pip_for_the_wheels_libraries_and_not_found_for_missing_ones(tmp_path):
    """After preloading the wheel's TensorRT, library_lines reports TensorRT from pip with the
    package, its version and file; a cuDNN the provider links but nobody installed is not found,
    with the loader's error."""
    package = fake_tensorrt_wheel(tmp_path / "site")
    provider = tmp_path / "libonnxruntime_providers_tensorrt.so"
    provider.write_bytes(b"\x7fELF\0libnvinfer.so.10\0libcudnn.so.77\0")
    result = run_fresh(tmp_path / "site", (
        "from pathlib import Path\n"
        "from findpeople.gpulibs import library_lines, preload_tensorrt\n"
        "preload_tensorrt()\n"
        f"print(json.dumps(library_lines(Path({str(provider)!r}))))\n"))
    assert result == [
        [False, "cuDNN (libcudnn.so.77): not found (libcudnn.so.77: cannot open shared object file: "
                "No such file or directory)"],
        [True, f"TensorRT version unknown (libnvinfer.so.10) from pip (tensorrt-cu13-libs "
               f"10.16.1.11): {package / 'libnvinfer.so.10'}"]], result
