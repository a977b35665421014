"""NVIDIA libraries: loading CUDA, cuDNN and TensorRT before ONNX Runtime's GPU providers need
them, and saying where each one comes from (a pip wheel or the system) and its version.

Runs in the workers, before their sessions are created, and in `--check` and
bench/gpu_check.py. In: the installed onnxruntime-gpu (its TensorRT provider's library names the
CUDA runtime, cuDNN and TensorRT it links) and the nvidia-* and tensorrt-cu*-libs pip wheels
that install_gpu.py installs. Out: CUDA and cuDNN loaded by onnxruntime.preload_dlls (the nvidia-*
wheels first, then the system's), TensorRT's libraries loaded from its wheel's `tensorrt_libs`
folder, which is on no loader path by itself (so nobody edits LD_LIBRARY_PATH or PATH), and
report lines. What is loaded stays loaded for the life of the process.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path


# The libraries --check reports: (name, soname on Linux, DLL on Windows). The major version in
# each pattern is read from the TensorRT provider's library, which links all four.
LINKED_LIBRARIES = (
    ("CUDA runtime", r"libcudart\.so\.(\d+)", r"cudart64_(\d+)\.dll"),
    ("cuBLAS", r"libcublas\.so\.(\d+)", r"cublas64_(\d+)\.dll"),
    ("cuDNN", r"libcudnn\.so\.(\d+)", r"cudnn64_(\d+)\.dll"),
    ("TensorRT", r"libnvinfer\.so\.(\d+)", r"nvinfer_(\d+)\.dll"),
)

_DLL_DIRECTORIES = []  # Windows: handles of os.add_dll_directory, kept so the folders stay added


def tensorrt_library_patterns(platform: str) -> tuple:
    """Return the file patterns of the TensorRT libraries that ONNX Runtime's TensorRT provider
    needs, in load order: the plugin and the ONNX parser need libnvinfer loaded first."""
    if platform == "win32":
        return ("nvinfer_[0-9]*.dll", "nvinfer_plugin_[0-9]*.dll", "nvonnxparser_[0-9]*.dll")
    return ("libnvinfer.so.[0-9]*", "libnvinfer_plugin.so.[0-9]*", "libnvonnxparser.so.[0-9]*")


def tensorrt_wheel_folder() -> Path | None:
    """Return the `tensorrt_libs` package folder that TensorRT's pip wheels (tensorrt-cu12-libs,
    tensorrt-cu13-libs) install, found on sys.path without importing it; None when not installed."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("tensorrt_libs")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def preload_tensorrt(folder: Path | None = None) -> tuple:
    """Load TensorRT's libraries from its pip wheel's folder (default: tensorrt_wheel_folder) into
    this process, so that ONNX Runtime's TensorRT provider finds them; return (files loaded, the
    problem or None). Nothing to do, ([], None), when the wheel is not installed."""
    import ctypes
    folder = folder or tensorrt_wheel_folder()
    if folder is None or not folder.is_dir():
        return [], None
    if sys.platform == "win32":
        _DLL_DIRECTORIES.append(os.add_dll_directory(str(folder)))  # for the DLLs these load
    loaded = []
    for pattern in tensorrt_library_patterns(sys.platform):
        for path in sorted(folder.glob(pattern)):
            try:
                ctypes.CDLL(str(path), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
            except OSError as error:
                return loaded, (f"{path} cannot be loaded ({error}); reinstall TensorRT: "
                                f"python install_gpu.py (docs/gpu.md)")
            loaded.append(path)
    return loaded, None


def load_nvidia_libraries(providers: list) -> list:
    """Load the libraries of the GPU providers in `providers` before any session is created: CUDA
    and cuDNN with onnxruntime.preload_dlls, TensorRT's with preload_tensorrt. Return what went
    wrong as lines to say; a library that is simply not installed is not one of them (the
    providers' own checks name it), so preload_dlls's own printing is kept out of the output."""
    import onnxruntime as ort
    problems = []
    if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()):  # it prints each library it did not find
            ort.preload_dlls()
    if "TensorrtExecutionProvider" in providers:
        problem = preload_tensorrt()[1]
        problems += [problem] if problem else []
    return problems


def linked_libraries(provider_library: Path, platform: str) -> dict:
    """Return {name: file name} of the CUDA runtime, cuBLAS, cuDNN and TensorRT libraries that a
    provider library links, read from its bytes (e.g. {"cuDNN": "libcudnn.so.9"}); {} when it is missing."""
    try:
        data = provider_library.read_bytes().decode("latin-1")
    except OSError:
        return {}
    found = {}
    for name, linux, windows in LINKED_LIBRARIES:
        match = re.search(windows if platform == "win32" else linux, data, re.IGNORECASE)
        if match:
            found[name] = match.group(0)
    return found


def loaded_library_path(file_name: str) -> Path | None:
    """Return the file of the library this process has loaded under file_name (Linux: the first
    mapped file whose name starts with it, so libcudart.so.13 finds libcudart.so.13.0.96), or None."""
    if sys.platform == "win32":
        return windows_module_path(file_name)
    try:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]).name.startswith(file_name):
            return Path(fields[5])
    return None


def windows_module_path(file_name: str) -> Path | None:
    """Return the file of a DLL this process has loaded (Windows), or None."""
    import ctypes
    from ctypes import wintypes
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.GetModuleHandleW.restype = wintypes.HMODULE
    kernel32.GetModuleFileNameW.argtypes = [wintypes.HMODULE, wintypes.LPWSTR, wintypes.DWORD]
    handle = kernel32.GetModuleHandleW(file_name)
    if not handle:
        return None
    buffer = ctypes.create_unicode_buffer(32768)
    return Path(buffer.value) if kernel32.GetModuleFileNameW(handle, buffer, 32768) else None


def pip_distribution_of(path: Path) -> tuple | None:
    """Return (distribution name, version) of the installed pip package that holds a file, or
    None when no package lists it (then it is the system's)."""
    from importlib import metadata
    target = Path(os.path.realpath(path))
    for dist in metadata.distributions():
        for file in dist.files or ():
            if file.name == target.name and Path(os.path.realpath(dist.locate_file(file))) == target:
                return dist.metadata["Name"], dist.version
    return None


def version_text(number: int) -> str:
    """Return a cuDNN or TensorRT version number as text: 92801 -> 9.28.1, 101601 -> 10.16.1
    (major x 10000 from cuDNN 9 and TensorRT 10 on), 8907 -> 8.9.7 (major x 1000 before)."""
    unit = 10000 if number >= 10000 else 1000
    return f"{number // unit}.{number % unit // 100}.{number % 100}"


def library_version(name: str, path: Path) -> str | None:
    """Return the version a loaded CUDA runtime, cuBLAS, cuDNN or TensorRT library reports of
    itself (cudaRuntimeGetVersion, cublasGetProperty, cudnnGetVersion, getInferLibVersion), or None."""
    import ctypes
    try:
        library = ctypes.CDLL(str(path))
        if name == "CUDA runtime":
            number = ctypes.c_int()
            if library.cudaRuntimeGetVersion(ctypes.byref(number)) != 0:
                return None
            return f"{number.value // 1000}.{number.value % 1000 // 10}"
        if name == "cuBLAS":  # cublasGetProperty: 0 major, 1 minor, 2 patch
            parts = [ctypes.c_int() for _ in range(3)]
            if any(library.cublasGetProperty(i, ctypes.byref(part)) for i, part in enumerate(parts)):
                return None
            return ".".join(str(part.value) for part in parts)
        function = library.cudnnGetVersion if name == "cuDNN" else library.getInferLibVersion
        function.restype = ctypes.c_size_t
        return version_text(function())
    except (OSError, AttributeError):
        return None


def find_library(file_name: str) -> tuple:
    """Return (path, None) of a library: loaded already (preloaded from a pip wheel), else as the
    system loader finds it; or (None, the loader's error)."""
    import ctypes
    path = loaded_library_path(file_name)
    if path is not None:
        return path, None
    try:
        ctypes.CDLL(file_name)
    except OSError as error:
        return None, str(error)
    return loaded_library_path(file_name) or Path(file_name), None


def library_lines(provider_library: Path) -> list:
    """Return (found, text) for each CUDA runtime, cuBLAS, cuDNN and TensorRT library that an
    onnxruntime-gpu provider library links: its version and whether it comes from pip (package
    and version) or the system, and its file; or that it is not found and the loader's error.
    Call load_nvidia_libraries first, so that the pip wheels' libraries are the ones found."""
    lines = []
    for name, file_name in linked_libraries(provider_library, sys.platform).items():
        path, error = find_library(file_name)
        if path is None:
            lines.append((False, f"{name} ({file_name}): not found ({error})"))
            continue
        version = library_version(name, path) or "version unknown"
        owner = pip_distribution_of(path)
        origin = f"pip ({owner[0]} {owner[1]})" if owner else "the system"
        lines.append((True, f"{name} {version} ({file_name}) from {origin}: {path}"))
    return lines
