"""Providers: which ONNX Runtime execution provider really loads, and opening sessions on it.

Runs in the workers (and in `--check`). In: a model file, --providers and the GPU a worker uses.
Out: an InferenceSession on the best provider of TensorRT -> CUDA -> CPU that loads, with the
reason for each better one that did not. TensorRT engines are cached in TRT_CACHE_DIR under a
key of model SHA-256, profile, GPU model and versions; one process at a time builds an engine,
into a temporary folder renamed into place.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import BadInput
from .settings import PROVIDER_ORDER, Settings
from .gpulibs import load_nvidia_libraries


_TRT_UNSUPPORTED_OPS = {"ConvInteger", "DynamicQuantizeLinear", "MatMulInteger"}  # int8 graphs


@dataclass(frozen=True)
class GpuSlot:
    """The GPU one worker process uses, and what its TensorRT engines are keyed by."""

    id: int  # CUDA device index: PCI bus order among the GPUs CUDA_VISIBLE_DEVICES leaves visible
    name: str  # the GPU model, e.g. "NVIDIA H200"
    tensorrt: str | None  # TensorRT version, None when it is not installed


@lru_cache(maxsize=16)
def model_op_types(model_path: Path) -> frozenset:
    """Return the op types a model's graph uses (read once per file)."""
    import onnx
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return frozenset(node.op_type for node in graph.node)


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provider_chain(choice: str, available: list) -> list:
    """Return the execution providers to try for --providers, best first; the CPU is always last."""
    wanted = [p for p in PROVIDER_ORDER[choice] if p in available]
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    return wanted


def provider_library(provider: str) -> Path | None:
    """Return the shared library file ONNX Runtime loads for a GPU provider (None for the CPU)."""
    import onnxruntime as ort
    stem = {"CUDAExecutionProvider": "onnxruntime_providers_cuda",
            "TensorrtExecutionProvider": "onnxruntime_providers_tensorrt"}.get(provider)
    if stem is None:
        return None
    name = f"{stem}.dll" if sys.platform == "win32" else f"lib{stem}.so"
    return Path(ort.__file__).parent / "capi" / name


def both_onnxruntime_builds_problem() -> str | None:
    """Return the explanation when onnxruntime and onnxruntime-gpu are both installed, else None."""
    if package_version("onnxruntime") and package_version("onnxruntime-gpu"):
        return ("onnxruntime and onnxruntime-gpu are both installed: they share one module folder "
                "and the CPU build can win. Fix: python install_gpu.py (docs/gpu.md), or by hand: "
                "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    return None


def provider_library_error(provider: str) -> str | None:
    """Return why ONNX Runtime's library of a GPU provider cannot be loaded - the system
    loader's error names the missing or mismatched CUDA/cuDNN/TensorRT library - or None when
    it loads (and for the CPU)."""
    import ctypes
    library = provider_library(provider)
    if library is None:
        return None
    if not library.is_file():
        return f"its library {library.name} is missing from the onnxruntime package: reinstall onnxruntime-gpu"
    try:
        ctypes.CDLL(str(library))
    except OSError as error:
        driver = any(name in str(error) for name in ("libcuda.so", "nvcuda.dll"))
        return (f"{library.name} cannot be loaded: {error} ({onnxruntime_gpu_build()}"
                f"{'; libcuda is the NVIDIA driver: no driver is installed' if driver else ''})")
    return None


def provider_load_problem(provider: str) -> str:
    """Return why ONNX Runtime cannot use a provider: not in this build, or its library's
    load error (see provider_library_error)."""
    import onnxruntime as ort
    both = both_onnxruntime_builds_problem()
    if provider not in ort.get_available_providers():
        build = "onnxruntime-gpu" if package_version("onnxruntime-gpu") else "onnxruntime"
        return both or (f"this onnxruntime build ({build} {ort.__version__}) has no {provider}: "
                        f"install the GPU build with python install_gpu.py (docs/gpu.md; a plain "
                        f"pip install onnxruntime-gpu leaves the CPU build beside it)")
    return provider_library_error(provider) or (
        f"its library loads, but the session did not use it; run with ORT_LOG_LEVEL=0 to see "
        f"ONNX Runtime's reason ({onnxruntime_gpu_build()})")


def tensorrt_missing(provider: str, verdict: str) -> bool:
    """Return True when a verdict on TensorRT only says TensorRT is not installed (onnxruntime-gpu
    lists it always): optional, unlike a CUDA provider that fails."""
    return provider == "TensorrtExecutionProvider" and ("nvinfer" in verdict or tensorrt_version() is None)


def onnxruntime_gpu_build() -> str:
    """Return the CUDA and cuDNN versions this onnxruntime-gpu was built for, as text."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return "build information unavailable"
    cuda, cudnn = getattr(info, "cuda_version", None), getattr(info, "cudnn_version", None)
    if not cuda:
        return "this onnxruntime is a CPU build"
    return f"onnxruntime-gpu {info.__version__} needs CUDA {cuda}" + (f" and cuDNN {cudnn}" if cudnn else "")


def tensorrt_unsupported_ops(model_path: Path) -> frozenset:
    """Return the ops of a model that TensorRT cannot run (int8 dynamic quantization)."""
    return model_op_types(model_path) & _TRT_UNSUPPORTED_OPS


def ort_log_level() -> int:
    """Return ONNX Runtime's log level from ORT_LOG_LEVEL (0 verbose .. 4 fatal; default 3,
    errors only); raise ValueError naming the variable for another value."""
    text = os.environ.get("ORT_LOG_LEVEL", "3").strip()
    if text not in ("0", "1", "2", "3", "4"):
        raise ValueError(f"ORT_LOG_LEVEL must be 0 (verbose) to 4 (fatal), got {text!r}")
    return int(text)


def session_options(threads: int):
    """Return ONNX Runtime session options that do not spin idle threads."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = ort_log_level()
    # Two sessions alternating on few cores slow each other 1.6-2.2x when idle threads spin.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def try_session(path: Path, pairs: list, options, say):
    """Return a session of the model on pairs (provider, options), best first, if the first
    provider really runs it; else None, having said why. ONNX Runtime's own silent retry on
    other providers is off (enable_fallback=0), so its real error is what is said."""
    import onnxruntime as ort
    provider = pairs[0][0]
    try:
        session = ort.InferenceSession(str(path), options, providers=[p for p, _ in pairs],
                                       provider_options=[o for _, o in pairs], enable_fallback=0)
    except Exception as error:  # a provider that fails to start is reported, then skipped
        say(f"{path.name}: {provider} failed ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0][:300]})")
        return None
    if session.get_providers()[0] == provider:
        return session
    say(f"{path.name}: {provider} did not load: {provider_load_problem(provider)}")
    return None


def open_session(path: Path, chain: list, options, say):
    """Return (session, provider it really runs on) for the first provider of chain (pairs of
    provider and options) that loads; the providers after it take the nodes it cannot run."""
    said = []
    for i, (provider, _) in enumerate(chain):
        session = try_session(path, chain[i:], options, lambda text: (said.append(text), say(text)))
        if session is not None:
            return session, provider
    raise BadInput(f"{path}: no execution provider could open it ({said[-1] if said else None}); "
                   f"the file may be damaged (download the pack again), or reinstall onnxruntime")


def model_input(model_path: Path) -> tuple:
    """Return (first input's name, its dims - None where dynamic -, output count) of a model."""
    import onnx
    graph = onnx.load(str(model_path), load_external_data=False).graph
    dims = [d.dim_value or None for d in graph.input[0].type.tensor_type.shape.dim]
    return graph.input[0].name, dims, len(graph.output)


def detector_profile(input_name: str, dims: list, batch_count: int, box_wh: tuple,
                     largest_stride_px: int = 32) -> dict:
    """Return the detector's TensorRT optimisation profile {input: (min, opt, max) shapes}:
    batches of 1..batch_count (a short last batch needs no new engine) and, for a detector of
    dynamic size, every trimmed input from its largest stride (one feature cell) up to the box
    (DET_SIZE x PRE_UPSCALE_FACTOR)."""
    height_px, width_px = dims[2] or box_wh[1], dims[3] or box_wh[0]
    low_h_px, low_w_px = dims[2] or largest_stride_px, dims[3] or largest_stride_px
    return {input_name: ((1, 3, low_h_px, low_w_px), (batch_count, 3, height_px, width_px),
                         (batch_count, 3, height_px, width_px))}


def recognizer_profile(input_name: str, chunk_count: int, side_px: int = 112) -> dict:
    """Return the recognizer's TensorRT optimisation profile: 1..chunk_count aligned faces."""
    return {input_name: ((1, 3, side_px, side_px), (chunk_count, 3, side_px, side_px),
                         (chunk_count, 3, side_px, side_px))}


def profile_text(profile: dict, which: int) -> str:
    """Return one of a profile's shape sets (0 min, 1 opt, 2 max) as ONNX Runtime's option text,
    e.g. 'input.1:1x3x32x32'; raise BadInput for an input name the text cannot hold."""
    bad = [name for name in profile if ":" in name or "," in name]
    if bad:
        raise BadInput(f"model input {bad[0]!r}: TensorRT profiles cannot name inputs with ':' or ','")
    return ",".join(f"{name}:{'x'.join(str(v) for v in shapes[which])}"
                    for name, shapes in sorted(profile.items()))


def engine_cache_key(model_sha256: str, profile: dict, gpu_name: str, trt_version: str,
                     ort_version: str, fp16: bool) -> str:
    """Return the 16-hex-digit key of one TensorRT engine: everything that makes an engine
    unusable elsewhere (model bytes, shape profile, GPU model, TensorRT and ONNX Runtime
    versions, precision) and nothing else, so nothing else causes a rebuild."""
    facts = {"model": model_sha256, "profile": {k: [list(s) for s in v] for k, v in profile.items()},
             "gpu": gpu_name, "tensorrt": trt_version, "onnxruntime": ort_version, "fp16": fp16}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def engine_folder(cache_dir: Path, model_path: Path, profile: dict, gpu: "GpuSlot",
                  fp16: bool) -> Path:
    """Return the folder of one model's TensorRT engine under TRT_CACHE_DIR (see engine_cache_key)."""
    import onnxruntime as ort
    key = engine_cache_key(file_sha256(model_path), profile, gpu.name, gpu.tensorrt or "unknown",
                           ort.__version__, fp16)
    return cache_dir / f"{model_path.stem}-{key}"


def needs_engine_build(folder: Path) -> bool:
    """Return True when a TensorRT engine folder holds no engine yet (the first run builds it).
    An engine folder only ever appears whole: see open_with_tensorrt."""
    return not any(folder.glob("*.engine"))


def tensorrt_options(folder: Path, profile: dict, gpu_id: int, fp16: bool) -> dict:
    """Return the TensorRT provider options: engine and timing cache in the engine's keyed
    folder, fp16, and explicit optimisation profiles."""
    return {"device_id": gpu_id, "trt_fp16_enable": fp16,
            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(folder),
            "trt_profile_min_shapes": profile_text(profile, 0),
            "trt_profile_opt_shapes": profile_text(profile, 1),
            "trt_profile_max_shapes": profile_text(profile, 2)}


def tensorrt_version() -> str | None:
    """Return the installed TensorRT version (pip package, else the library's own number), or None."""
    import ctypes
    for name in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-libs", "tensorrt-cu12-libs",
                 "tensorrt-libs"):
        if package_version(name):
            return package_version(name)
    for library in ("libnvinfer.so.10", "libnvinfer.so.8", "nvinfer_10.dll", "nvinfer.dll"):
        try:
            return f"lib{ctypes.CDLL(library).getInferLibVersion()}"
        except (OSError, AttributeError):
            continue
    return None


def visible_gpu_names() -> list:
    """Return the names of the GPUs CUDA sees, in CUDA's order (PCI bus order, as nvidia-smi
    numbers them; CUDA_VISIBLE_DEVICES respected); [] when nvidia-smi is not there."""
    names = [line.split(",")[0].strip() for line in visible_gpus()]
    chosen = os.environ.get("CUDA_VISIBLE_DEVICES")
    if chosen is None or not names:
        return names
    picked = []
    for entry in (e.strip() for e in chosen.split(",") if e.strip()):
        if not entry.lstrip("-").isdigit():
            picked.append(f"GPU {entry}")  # a UUID or MIG name: its model is not looked up
        elif int(entry) < 0:
            break  # CUDA stops at the first invalid index
        elif int(entry) < len(names):
            picked.append(names[int(entry)])
    return picked


def worker_gpu_ids(worker_count: int, device_ids: tuple, visible_count: int) -> list:
    """Return the CUDA device index of each worker: worker i takes the (i mod n)-th of
    GPU_DEVICE_IDS, or of all visible GPUs when it is empty; raise ValueError for an id that is
    not visible."""
    ids = list(device_ids) or list(range(max(1, visible_count)))
    missing = [i for i in ids if visible_count and i >= visible_count]
    if missing:
        raise ValueError(f"--gpu-device-ids {','.join(map(str, device_ids))}: GPU {missing[0]} is "
                         f"not visible ({visible_count} GPU(s) visible, numbered from 0)")
    return [ids[worker % len(ids)] for worker in range(worker_count)]


def gpu_slots(settings: Settings, worker_count: int) -> list:
    """Return one GpuSlot per worker process (parent only)."""
    names = visible_gpu_names()
    version = tensorrt_version()
    ids = worker_gpu_ids(worker_count, settings.GPU_DEVICE_IDS, len(names))
    return [GpuSlot(i, names[i] if i < len(names) else f"GPU {i}", version) for i in ids]


def usable_chain(path: Path, chain: list, say) -> list:
    """Return the providers of chain that can serve this model, saying why the others cannot: a
    GPU provider whose library does not load, and TensorRT for int8 graphs it cannot run."""
    usable = []
    for provider in chain:
        why = provider_library_error(provider)
        if why is None and provider == "TensorrtExecutionProvider" and tensorrt_unsupported_ops(path):
            why = (f"TensorRT cannot run {', '.join(sorted(tensorrt_unsupported_ops(path)))} (int8 "
                   f"dynamic quantization); this model runs on the next provider")
        if why is None:
            usable.append(provider)
        else:
            say(f"{path.name}: {provider} cannot be used: {why}")
    return usable


def provider_options(provider: str, gpu: GpuSlot) -> dict:
    """Return the options of a CUDA or CPU provider on this worker's GPU."""
    if provider == "CUDAExecutionProvider":
        return {"device_id": gpu.id, "cudnn_conv_algo_search": "HEURISTIC"}
    return {}


def open_with_tensorrt(path: Path, chain: list, profile: dict, options, gpu: GpuSlot,
                       settings: Settings, say):
    """Return a TensorRT session of the model with its engine from the keyed folder, or None
    (said why). One process at a time (a file lock): the first builds the engine into a
    temporary folder, renamed into place only once the session works, so an interrupted or
    failed build leaves nothing a later run would trust; the others then load it."""
    folder = engine_folder(Path(settings.TRT_CACHE_DIR), path, profile, gpu, settings.TRT_FP16)
    folder.parent.mkdir(parents=True, exist_ok=True)
    rest = [(p, provider_options(p, gpu)) for p in chain[1:]]
    with engine_lock(folder, path, say):
        for stale in folder.parent.glob(f"{folder.name}.build-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a build that was killed
        if not needs_engine_build(folder):
            trt = ("TensorrtExecutionProvider", tensorrt_options(folder, profile, gpu.id, settings.TRT_FP16))
            session = try_session(path, [trt, *rest], options, say)
            if session is not None:
                return session
            say(f"{path.name}: the cached engine in {folder} did not load; building it again")
            shutil.rmtree(folder, ignore_errors=True)
        return build_tensorrt_engine(path, folder, rest, profile, options, gpu, settings, say)


@contextlib.contextmanager
def engine_lock(folder: Path, path: Path, say):
    """Hold the file lock of one engine folder, saying so when another process holds it (it is
    building the engine: this one waits, then loads it)."""
    import filelock
    lock = filelock.FileLock(str(folder) + ".lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        say(f"{path.name}: another worker is building or loading its TensorRT engine; waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def build_tensorrt_engine(path: Path, folder: Path, rest: list, profile: dict, options,
                          gpu: GpuSlot, settings: Settings, say):
    """Return a TensorRT session whose engine was just built into folder, or None (said why)."""
    say(f"[*] WARMUP: Generating TensorRT engine for {path.name} in {folder} (first run only; minutes)")
    build = folder.with_name(f"{folder.name}.build-{os.getpid()}")
    build.mkdir()
    trt = ("TensorrtExecutionProvider", tensorrt_options(build, profile, gpu.id, settings.TRT_FP16))
    session = try_session(path, [trt, *rest], options, say)
    if session is not None and needs_engine_build(build):
        say(f"{path.name}: TensorRT built no engine file in {build}; it is not cached, and the "
            f"model runs on the next provider")
        session = None
    if session is None:
        shutil.rmtree(build, ignore_errors=True)
        return None
    try:
        shutil.rmtree(folder, ignore_errors=True)  # a folder without an engine, e.g. emptied by hand
        os.replace(build, folder)  # the session keeps its engine; later runs find the folder
    except OSError as error:
        say(f"{path.name}: the engine could not be cached in {folder} ({error}); the next run builds it again")
    return session


def open_model(path: Path, chain: list, profile: dict, threads: int, gpu: GpuSlot,
               settings: Settings, say) -> tuple:
    """Return (session, provider) for one model on the best provider of chain that loads."""
    chain = usable_chain(path, chain, say)
    options = session_options(threads)
    if chain[0] == "TensorrtExecutionProvider":
        session = open_with_tensorrt(path, chain, profile, options, gpu, settings, say)
        if session is not None:
            return session, chain[0]
        chain = chain[1:]
    return open_session(path, [(p, provider_options(p, gpu)) for p in chain], options, say)


def package_version(name: str) -> str | None:
    """Return an installed distribution's version, or None."""
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def working_providers(model_path: Path) -> dict:
    """Return {provider: "loads" or why not} by opening the model with each GPU provider alone
    (and the CPU). "not in this build: ..." is a provider this onnxruntime lacks (optional with
    --providers auto); "cannot be loaded: ..." one it has whose libraries do not load."""
    import onnxruntime as ort
    ort.set_default_logger_severity(ort_log_level())
    available = ort.get_available_providers()
    trt_problems = load_nvidia_libraries(available)  # as the workers do (gpulibs.py)
    verdicts = {}
    for provider in PROVIDER_ORDER["auto"]:
        if provider not in available:
            if provider != "CPUExecutionProvider":
                verdicts[provider] = f"not in this build: {provider_load_problem(provider)}"
            continue
        if provider == "TensorrtExecutionProvider" and trt_problems:
            verdicts[provider] = f"cannot be loaded: {trt_problems[0]}"
            continue
        if provider_library_error(provider):
            verdicts[provider] = f"cannot be loaded: {provider_library_error(provider)}"
            continue
        try:
            session = ort.InferenceSession(str(model_path), providers=[provider], enable_fallback=0)
            active = session.get_providers()
            verdicts[provider] = ("loads" if provider in active else
                                  f"listed, but the session fell back to {active}: "
                                  f"{provider_load_problem(provider)}")
        except Exception as error:  # a provider that cannot load is what we report
            verdicts[provider] = f"fails: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return verdicts


def optional_provider(provider: str, verdict: str) -> bool:
    """Return True when a provider's verdict is no problem with --providers auto: it is not in
    this build, or it is TensorRT, which is not installed (onnxruntime-gpu always lists it)."""
    return verdict.startswith("not in this build") or tensorrt_missing(provider, verdict)


def visible_gpus() -> list:
    """Return the NVIDIA GPUs nvidia-smi lists ("name, memory"), or [] when it is not there."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]
