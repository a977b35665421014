"""Providers (findpeople/providers.py): the best provider that really loads, TensorRT engines
built once and cached, GPUs picked for the workers."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import PACK_DIR
from conftest import SHARED
from findpeople.errors import BadInput
from findpeople.providers import (
    GpuSlot, both_onnxruntime_builds_problem, detector_profile, engine_cache_key, engine_folder,
    needs_engine_build, open_model, open_session, ort_log_level, profile_text, provider_chain,
    provider_library_error, provider_load_problem, recognizer_profile, session_options,
    tensorrt_options, tensorrt_unsupported_ops, usable_chain, visible_gpu_names, worker_gpu_ids)


@pytest.mark.parametrize("choice, available, expected", [
    ("auto", ["CPUExecutionProvider"], ["CPUExecutionProvider"]),
    ("auto", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
     ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("cuda", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
     ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
    ("tensorrt", ["CPUExecutionProvider"], ["CPUExecutionProvider"]),
])
def test_provider_chain_is_the_best_available_first(main_module, choice, available, expected):
    """--providers picks the available providers in order TensorRT, CUDA, CPU; CPU is always last."""
    assert provider_chain(choice, available) == expected


def test_a_provider_that_does_not_load_is_skipped_with_its_reason(main_module, monkeypatch, tmp_path):
    """open_session asks for each provider in turn and checks which one the session really uses:
    CUDA 'available' but its library broken (a file that is no shared library) is reported with
    the loader's error, and the model opens on the CPU."""
    import onnxruntime as ort
    broken = tmp_path / "libonnxruntime_providers_cuda.so"
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr("findpeople.providers.provider_library", lambda provider: broken)
    said = []
    session, provider = open_session(
        PACK_DIR / "det_500m.onnx", [("CUDAExecutionProvider", {}), ("CPUExecutionProvider", {})],
        session_options(1), said.append)
    assert provider == "CPUExecutionProvider" and session.get_providers() == ["CPUExecutionProvider"]
    assert len(said) == 1 and "CUDAExecutionProvider" in said[0], said
    assert "libonnxruntime_providers_cuda.so cannot be loaded" in said[0], said
    assert "invalid ELF header" in said[0] or "too short" in said[0], said


def test_a_provider_missing_from_the_build_says_which_package_to_install(main_module):
    """On a CPU build, CUDA's problem names onnxruntime-gpu and the GPU install as the fix."""
    problem = provider_load_problem("CUDAExecutionProvider")
    assert "has no CUDAExecutionProvider" in problem and "onnxruntime-gpu" in problem, problem
    assert "python install_gpu.py" in problem, problem


def test_both_onnxruntime_builds_installed_is_detected(main_module, monkeypatch):
    """onnxruntime and onnxruntime-gpu together are reported with the commands that fix it."""
    monkeypatch.setattr("findpeople.providers.package_version", lambda name: "1.20.0")
    problem = both_onnxruntime_builds_problem()
    assert problem and "python install_gpu.py" in problem, problem
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in problem, problem


@pytest.mark.parametrize("loader_error, driver_hint", [
    ("libcuda.so.1: cannot open shared object file: No such file or directory", True),
    ("nvcuda.dll: The specified module could not be found", True),
    ("libcudnn.so.9: cannot open shared object file: No such file or directory", False),
])
def test_a_missing_nvidia_driver_library_is_named_as_the_driver(main_module, monkeypatch, tmp_path,
                                                               loader_error, driver_hint):
    """The CUDA provider's library needs libcuda (nvcuda.dll), which only the NVIDIA driver
    installs: its load error says so (issue #15: a GPU install on a machine without a GPU)."""
    import ctypes
    library = tmp_path / "libonnxruntime_providers_cuda.so"
    library.write_bytes(b"")
    monkeypatch.setattr("findpeople.providers.provider_library", lambda provider: library)

    def refuse(path, *args, **kwargs):
        raise OSError(loader_error)

    monkeypatch.setattr(ctypes, "CDLL", refuse)
    problem = provider_library_error("CUDAExecutionProvider")
    assert loader_error in problem, problem
    assert ("no driver is installed" in problem) == driver_hint, problem


BASE_KEY = dict(model_sha256="a" * 64, profile={"input.1": ((1, 3, 32, 32), (8, 3, 640, 640),
                                                             (8, 3, 640, 640))},
                gpu_name="NVIDIA H200", trt_version="10.9.0", ort_version="1.22.0", fp16=True)


@pytest.mark.parametrize("change", [
    {"model_sha256": "b" * 64},
    {"profile": {"input.1": ((1, 3, 32, 32), (16, 3, 640, 640), (16, 3, 640, 640))}},
    {"gpu_name": "NVIDIA GeForce RTX 4090"},
    {"trt_version": "10.11.0"},
    {"ort_version": "1.23.0"},
    {"fp16": False},
])
def test_engine_cache_key_changes_with_what_makes_an_engine_unusable(main_module, change):
    """A different model file, shape profile, GPU model, TensorRT or ONNX Runtime version or
    precision gets its own engine folder."""
    before = engine_cache_key(**BASE_KEY)
    after = engine_cache_key(**{**BASE_KEY, **change})
    assert before != after, change


def test_engine_cache_key_is_stable_for_the_same_facts(main_module, tmp_path):
    """The same facts give the same key (a second run reuses the engine), whatever the model
    file's path: the key hashes the model's bytes."""
    first = engine_cache_key(**BASE_KEY)
    assert first == engine_cache_key(**dict(BASE_KEY))
    assert re.fullmatch(r"[0-9a-f]{16}", first), first
    copy = tmp_path / "elsewhere" / "det_500m.onnx"
    copy.parent.mkdir()
    copy.write_bytes((PACK_DIR / "det_500m.onnx").read_bytes())
    gpu = GpuSlot(0, "NVIDIA H200", "10.9.0")
    a = engine_folder(tmp_path / "c", PACK_DIR / "det_500m.onnx", BASE_KEY["profile"], gpu, True)
    b = engine_folder(tmp_path / "c", copy, BASE_KEY["profile"], gpu, True)
    assert a == b and a.parent == tmp_path / "c", (a, b)


def test_tensorrt_options_have_caches_fp16_and_explicit_profiles(main_module, tmp_path):
    """TensorRT gets its engine folder (engine and timing cache), fp16 and min/opt/max shapes
    that cover batches 1..BATCH_SIZE and every trimmed detector input, from the largest stride
    (one feature cell) up to DET_SIZE."""
    profile = detector_profile("input.1", [None, 3, None, None], 8, (640, 640), 32)
    options = tensorrt_options(tmp_path / "e", profile, 1, True)
    assert options["device_id"] == 1 and options["trt_fp16_enable"] is True
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(tmp_path / "e")
    assert options["trt_timing_cache_enable"] and options["trt_timing_cache_path"] == str(tmp_path / "e")
    assert options["trt_profile_min_shapes"] == "input.1:1x3x32x32"
    assert options["trt_profile_opt_shapes"] == "input.1:8x3x640x640"
    assert options["trt_profile_max_shapes"] == "input.1:8x3x640x640"
    five_levels = detector_profile("input.1", [None, 3, None, None], 8, (640, 640), 128)
    assert profile_text(five_levels, 0) == "input.1:1x3x128x128"
    fixed = detector_profile("images", [1, 3, 640, 640], 8, (1280, 1280))
    assert profile_text(fixed, 0) == "images:1x3x640x640"
    assert profile_text(fixed, 2) == "images:8x3x640x640"
    rec = recognizer_profile("input.1", 32)
    assert profile_text(rec, 0) == "input.1:1x3x112x112"
    assert profile_text(rec, 2) == "input.1:32x3x112x112"
    with pytest.raises(BadInput, match="':' or ','"):
        profile_text({"a:b": rec["input.1"]}, 0)


def test_warmup_is_announced_only_while_no_engine_is_cached(main_module, tmp_path):
    """The first run (empty engine folder) builds; once an engine file is there, it is reused."""
    folder = tmp_path / "det_500m-0123456789abcdef"
    folder.mkdir()
    assert needs_engine_build(folder)
    (folder / "TensorrtExecutionProvider_TRTKernel_graph_1_0_0_fp16_sm90.engine").write_bytes(b"x")
    assert not needs_engine_build(folder)


class FakeTensorrtSession:
    """Stands in for onnxruntime.InferenceSession: records each call; with TensorRT first it
    'builds' an engine file into the cache folder it was given, or fails as `fail` says."""

    calls: list = []
    fail: set = set()  # "build": a new engine fails; "load": a cached engine fails

    def __init__(self, path, options=None, providers=None, provider_options=None, enable_fallback=1):
        assert enable_fallback == 0, "ONNX Runtime's silent retry on other providers must be off"
        FakeTensorrtSession.calls.append((list(providers), list(provider_options or [])))
        self.providers = list(providers)
        if providers[0] == "TensorrtExecutionProvider":
            folder = Path(provider_options[0]["trt_engine_cache_path"])
            cached = any(folder.glob("*.engine"))
            if ("load" if cached else "build") in FakeTensorrtSession.fail:
                raise RuntimeError("TensorRT EP could not deserialize engine" if cached else "build failed")
            (folder / "TensorrtExecutionProvider_TRTKernel_graph_main_1_0_0_fp16_sm90.engine").write_bytes(b"e")

    def get_providers(self):
        return self.providers


@pytest.fixture()
def fake_tensorrt(main_module, monkeypatch):
    """TensorRT and CUDA 'available' with loadable libraries, sessions faked (no GPU here)."""
    import onnxruntime as ort
    monkeypatch.setattr(ort, "InferenceSession", FakeTensorrtSession)
    monkeypatch.setattr("findpeople.providers.provider_library_error", lambda provider: None)
    FakeTensorrtSession.calls, FakeTensorrtSession.fail = [], set()
    return FakeTensorrtSession


def open_detector(main_module, settings, gpu):
    """Open det_500m on [TensorRT, CUDA, CPU]; return (session, provider, what was said)."""
    said = []
    profile = detector_profile("input.1", [1, 3, None, None], 1, (640, 640))
    session, provider = open_model(
        PACK_DIR / "det_500m.onnx", ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                     "CPUExecutionProvider"], profile, 1, gpu, settings, said.append)
    return session, provider, said


def test_a_tensorrt_engine_is_built_once_then_loaded_on_its_gpu(main_module, fake_tensorrt, tmp_path):
    """First run: WARMUP, the engine is built into a temporary folder that becomes the keyed
    folder only once it works. Second run: no WARMUP, the same folder. Worker 1's GPU id reaches
    TensorRT's and CUDA's options."""
    settings = main_module.load_settings(["--trt-cache-dir", str(tmp_path / "cache")])
    gpu = GpuSlot(1, "NVIDIA H200", "10.9.0")
    _, provider, said = open_detector(main_module, settings, gpu)
    assert provider == "TensorrtExecutionProvider" and sum("WARMUP" in t for t in said) == 1, said
    folders = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(folders) == 1 and folders[0].name.startswith("det_500m-"), folders
    assert not needs_engine_build(folders[0]) and ".build-" not in folders[0].name
    _, provider, said = open_detector(main_module, settings, gpu)
    assert provider == "TensorrtExecutionProvider" and not any("WARMUP" in t for t in said), said
    providers, options = fake_tensorrt.calls[-1]
    assert options[0]["trt_engine_cache_path"] == str(folders[0]) and options[0]["device_id"] == 1
    assert providers[1] == "CUDAExecutionProvider" and options[1]["device_id"] == 1, options
    assert len(fake_tensorrt.calls) == 2, "the second run should load, not build"


def test_a_failed_build_leaves_no_engine_folder_and_the_next_provider_runs(main_module, fake_tensorrt,
                                                                           tmp_path):
    """A TensorRT build that fails (or is killed: a stale .build-<pid> folder) leaves nothing a
    later run would load; the model opens on CUDA with TensorRT's error said."""
    settings = main_module.load_settings(["--trt-cache-dir", str(tmp_path / "cache")])
    gpu = GpuSlot(0, "NVIDIA H200", "10.9.0")
    fake_tensorrt.fail = {"build"}
    _, provider, said = open_detector(main_module, settings, gpu)
    assert provider == "CUDAExecutionProvider", said
    assert any("TensorrtExecutionProvider failed" in t and "build failed" in t for t in said), said
    assert [p for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [], "a failed build left a folder"
    fake_tensorrt.fail = set()
    open_detector(main_module, settings, gpu)
    folder = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    (tmp_path / "cache" / f"{folder.name}.build-999999").mkdir()  # as a killed build leaves it
    open_detector(main_module, settings, gpu)
    assert not list((tmp_path / "cache").glob("*.build-*")), "a killed build's folder was kept"


def test_a_cached_engine_that_does_not_load_is_rebuilt(main_module, fake_tensorrt, tmp_path):
    """An engine TensorRT cannot deserialize (damaged, or from elsewhere) is said and rebuilt,
    instead of every later run silently running on CUDA."""
    settings = main_module.load_settings(["--trt-cache-dir", str(tmp_path / "cache")])
    gpu = GpuSlot(0, "NVIDIA H200", "10.9.0")
    open_detector(main_module, settings, gpu)
    fake_tensorrt.fail = {"load"}
    _, provider, said = open_detector(main_module, settings, gpu)
    assert provider == "TensorrtExecutionProvider", said
    assert any("did not load; building it again" in t for t in said), said
    assert any("WARMUP" in t for t in said), said


def test_no_warmup_when_tensorrt_cannot_load(main_module, monkeypatch, tmp_path):
    """onnxruntime-gpu lists TensorRT even without TensorRT installed: its library's load error
    is said, no WARMUP is printed, no engine folder made, and the model opens on the next provider."""
    broken = tmp_path / "libonnxruntime_providers_tensorrt.so"
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr("findpeople.providers.provider_library",                         lambda p: broken if p.startswith("Tensorrt") else None)
    settings = main_module.load_settings(["--trt-cache-dir", str(tmp_path / "cache")])
    said = []
    _, provider = open_model(
        PACK_DIR / "det_500m.onnx", ["TensorrtExecutionProvider", "CPUExecutionProvider"],
        {}, 1, GpuSlot(0, "GPU 0", None), settings, said.append)
    assert provider == "CPUExecutionProvider" and not any("WARMUP" in t for t in said), said
    assert any("TensorrtExecutionProvider cannot be used" in t and "cannot be loaded" in t
               for t in said), said
    assert not (tmp_path / "cache").exists()


def test_int8_models_are_kept_off_tensorrt_with_a_message(main_module, monkeypatch):
    """usable_chain drops TensorRT for the int8 recognizer (ConvInteger), saying why, and keeps
    it for the fp32 detector."""
    monkeypatch.setattr("findpeople.providers.provider_library_error", lambda provider: None)
    chain = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    said = []
    assert usable_chain(PACK_DIR / "w600k_mbf_int8.onnx", chain, said.append) == chain[1:]
    assert len(said) == 1 and "ConvInteger" in said[0] and "next provider" in said[0], said
    assert usable_chain(PACK_DIR / "det_500m.onnx", chain, said.append) == chain


@pytest.mark.parametrize("model, unsupported", [
    (PACK_DIR / "w600k_mbf_int8.onnx", {"ConvInteger", "DynamicQuantizeLinear"}),
    (PACK_DIR / "det_500m.onnx", set()),
    (SHARED / "models" / "extra" / "faceplugin_fr_feature_512.onnx", set()),
])
def test_int8_models_are_kept_off_tensorrt(main_module, model, unsupported):
    """ConvInteger/DynamicQuantizeLinear graphs cannot run on TensorRT: they are found by op."""
    assert tensorrt_unsupported_ops(model) >= unsupported
    assert bool(tensorrt_unsupported_ops(model)) == bool(unsupported)


@pytest.mark.parametrize("workers, ids, visible, expected", [
    (1, (), 1, [0]),
    (4, (), 2, [0, 1, 0, 1]),
    (3, (), 4, [0, 1, 2]),
    (4, (2, 3), 4, [2, 3, 2, 3]),
    (2, (1,), 2, [1, 1]),
    (2, (), 0, [0, 0]),  # no nvidia-smi: CUDA's default device
])
def test_workers_spread_over_the_visible_gpus(main_module, workers, ids, visible, expected):
    """Worker i runs on GPU (i mod count) of GPU_DEVICE_IDS, or of all visible GPUs."""
    assert worker_gpu_ids(workers, ids, visible) == expected


def test_a_gpu_id_that_is_not_visible_is_refused_by_name(main_module):
    """GPU_DEVICE_IDS naming GPU 2 on a 2-GPU machine is an error naming the flag and the GPU."""
    with pytest.raises(ValueError, match=r"--gpu-device-ids 0,2: GPU 2 is not visible"):
        worker_gpu_ids(2, (0, 2), 2)


@pytest.mark.parametrize("env, smi, expected", [
    (None, ["NVIDIA H200, 143771 MiB", "NVIDIA A100, 81920 MiB"], ["NVIDIA H200", "NVIDIA A100"]),
    ("1", ["NVIDIA H200, 143771 MiB", "NVIDIA A100, 81920 MiB"], ["NVIDIA A100"]),
    ("1,0", ["NVIDIA H200, 1 MiB", "NVIDIA A100, 1 MiB"], ["NVIDIA A100", "NVIDIA H200"]),
    ("0,-1,1", ["NVIDIA H200, 1 MiB", "NVIDIA A100, 1 MiB"], ["NVIDIA H200"]),
    ("", ["NVIDIA H200, 1 MiB"], []),
])
def test_visible_gpus_follow_cuda_visible_devices(main_module, monkeypatch, env, smi, expected):
    """CUDA_VISIBLE_DEVICES picks and orders the GPUs workers can use (CUDA stops at -1)."""
    monkeypatch.setattr("findpeople.providers.visible_gpus", lambda: smi)
    if env is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    assert visible_gpu_names() == expected


@pytest.mark.parametrize("value, level", [(None, 3), ("0", 0), ("4", 4), (" 2 ", 2), ("verbose", None), ("5", None)])
def test_ort_log_level_is_read_and_checked(main_module, monkeypatch, value, level):
    """ORT_LOG_LEVEL sets ONNX Runtime's log level, 0..4 (default 3: errors only); another value
    is refused naming the variable."""
    if value is None:
        monkeypatch.delenv("ORT_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("ORT_LOG_LEVEL", value)
    if level is None:
        with pytest.raises(ValueError, match="ORT_LOG_LEVEL must be 0"):
            ort_log_level()
    else:
        assert ort_log_level() == level
        assert session_options(1).log_severity_level == level
