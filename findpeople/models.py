"""Models: find the InsightFace pack, tell detector from recognizer, and load both for a worker.

Runs in the workers and, for the reference photos, in the parent. In: MODEL_ROOT and
MODEL_PACK_NAME (<root>/models/<pack>/ or <root>/<pack>/), --providers, the worker's GPU. Out:
`FaceModels`: the two sessions, what their outputs mean, the providers they really run on, and
(when frames go to the device) the device graphs. On a GPU the detector is a batch-capable copy
of the pack's file, kept in TRT_CACHE_DIR/batched/ and proven equal before use.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInput
from .settings import PROVIDER_ORDER, Settings
from .outputs import write_bytes_atomic
from .gpulibs import load_nvidia_libraries
from .providers import (
    GpuSlot, detector_profile, file_sha256, model_input, model_op_types, open_model, ort_log_level,
    provider_chain, provider_load_problem, recognizer_profile, tensorrt_unsupported_ops,
    visible_gpus)
from .detect import detector_box_size
from .device import DeviceGraphs


# SCRFD output count -> (strides, anchors per location, has keypoints).
_SCRFD_LAYOUTS = {
    6: ((8, 16, 32), 2, False),
    9: ((8, 16, 32), 2, True),
    10: ((8, 16, 32, 64, 128), 1, False),
    15: ((8, 16, 32, 64, 128), 1, True),
}


_BATCHED_EDIT_VERSION = 1  # of make_detector_batchable: a change gets new batch-capable copies


@dataclass
class FaceModels:
    """Loaded detector and recognizer sessions plus what their outputs mean."""

    det_session: object
    det_input_name: str
    det_output_names: list
    det_strides: tuple
    det_anchors: int
    det_fixed_size: tuple | None  # (width, height) when the model fixes its input size
    rec_session: object
    rec_input_name: str
    rec_mean: float
    rec_std: float
    providers: dict  # model file name -> providers ONNX Runtime reports as active
    rec_max_chunk: int  # 1 for dynamically quantized recognizers (see uses_dynamic_quantization)
    det_path: str = ""  # the pack's detector file
    rec_path: str = ""
    det_batched: bool = False  # det_session takes [N,3,H,W] and returns [N, anchors, C]
    det_file: str = ""  # the file det_session runs: det_path, or its batch-capable copy
    gpu: GpuSlot | None = None
    device: DeviceGraphs | None = None  # set when frames go to the models' device (FRAMES_ON_DEVICE)


def find_model_pack(model_root: str, pack: str) -> Path:
    """Return the pack folder: <root>/models/<pack>, or <root>/<pack>; download it when missing."""
    root = Path(model_root).expanduser()
    for candidate in (root / "models" / pack, root / pack):
        if candidate.is_dir() and any(candidate.glob("*.onnx")):
            return candidate
    try:
        from insightface.utils import ensure_available
        return Path(ensure_available("models", pack, root=str(root)))
    except Exception as error:  # any download failure becomes one clear message
        raise BadInput(
            f"model pack {pack!r} not found in {root / 'models' / pack} and could not be downloaded "
            f"({type(error).__name__}: {error}). Put the pack's .onnx files there (a SCRFD "
            f"detector such as det_10g.onnx and an ArcFace recognizer such as w600k_r50.onnx), or "
            f"set --model-root / --model-pack") from None


def classify_pack_models(pack_dir: Path) -> tuple:
    """Return (detector path, recognizer path) by the ONNX graphs' inputs and outputs."""
    import onnx
    detector = recognizer = None
    for path in sorted(pack_dir.glob("*.onnx")):
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception as error:
            raise BadInput(f"{path}: not a valid ONNX model ({error}); download the pack again")
        if not graph.input or not graph.output:  # an empty file parses as an empty model
            raise BadInput(f"{path}: not a valid ONNX model (empty or truncated); download the pack again")
        dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        if len(graph.output) >= 5 and detector is None:
            detector = path
        elif len(dims) == 4 and dims[2] == dims[3] and dims[2] not in (96, 192) \
                and dims[2] >= 112 and dims[2] % 16 == 0 and recognizer is None:
            recognizer = path  # insightface's rule; 192 px are landmark and 96 px attribute models
    if detector is None or recognizer is None:
        raise BadInput(f"{pack_dir}: needs a SCRFD detector and an ArcFace recognizer .onnx; "
                       f"found {[p.name for p in pack_dir.glob('*.onnx')]}")
    return detector, recognizer


def uses_dynamic_quantization(model_path: Path) -> bool:
    """Return True if the graph quantizes activations per call (DynamicQuantizeLinear).

    Such a model computes one scale over its whole input, so a face embedded together with
    others comes out different (measured: cosine down to 0.95 on buffalo_sc_int8): results
    would depend on how frames happened to be batched. Those models get one face per call.
    """
    return "DynamicQuantizeLinear" in model_op_types(model_path)


def output_reshape(graph, output_name: str, producers: dict):
    """Return the Reshape node that flattens one SCRFD output (behind a Sigmoid, say), or None."""
    node = producers.get(output_name)
    while node is not None and node.op_type in ("Sigmoid", "Identity", "Mul", "Add"):
        node = producers.get(node.input[0])
    return node if node is not None and node.op_type == "Reshape" else None


def constant_values(graph, name: str):
    """Return a graph initializer's or Constant node's values as a NumPy array, or None."""
    from onnx import numpy_helper
    for tensor in graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def make_detector_batchable(model) -> str | None:
    """Edit an SCRFD graph in place so it takes [N,3,H,W] and returns [N, anchors, C] per output;
    return None, or why it cannot be done.

    InsightFace's det_500m/det_10g transpose each head [N,C,H,W] to [H,W,N,C] and reshape it to
    [-1, C]: with N > 1 the images' anchors come out interleaved, which is why only freeing the
    batch axis gives wrong results. The transpose becomes [N,H,W,C] and the reshape [N,-1,C]
    (0 = keep the batch); graphs that already reshape by their input's batch stay as they are.
    """
    from onnx import numpy_helper
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    for output in graph.output:
        reshape = output_reshape(graph, output.name, producers)
        transpose = producers.get(reshape.input[0]) if reshape is not None else None
        if transpose is None or transpose.op_type != "Transpose":
            return f"output {output.name} is not a transposed, reshaped head"
        perm = list(transpose.attribute[0].ints)
        if perm == [2, 3, 0, 1]:
            transpose.attribute[0].ints[:] = [0, 2, 3, 1]
        elif perm != [0, 2, 3, 1]:
            return f"output {output.name}: unexpected transpose {perm}"
        shape = constant_values(graph, reshape.input[1])
        if shape is not None:
            if len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != 1):
                return f"output {output.name}: unexpected reshape to {shape.tolist()}"
            name = f"{reshape.output[0]}_batched_shape"
            graph.initializer.append(numpy_helper.from_array(
                np.array([0, -1, int(shape[-1])], np.int64), name))
            reshape.input[1] = name
        channels = output.type.tensor_type.shape.dim[-1].dim_value
        del output.type.tensor_type.shape.dim[:]
        for dim in ("batch", "anchors", channels):
            output.type.tensor_type.shape.dim.add().CopyFrom(onnx_dim(dim))
    graph.input[0].type.tensor_type.shape.dim[0].CopyFrom(onnx_dim("batch"))
    del graph.value_info[:]  # shapes inferred for batch 1 are stale now
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:  # the old [-1, C] shapes
        graph.initializer.remove(tensor)
    return None


def onnx_dim(value):
    """Return an ONNX tensor dimension: a number, or a named (symbolic) one."""
    from onnx import TensorShapeProto
    dim = TensorShapeProto.Dimension()
    if isinstance(value, str):
        dim.dim_param = value
    else:
        dim.dim_value = value
    return dim


def batch_outputs_match(original: Path, batched: bytes, input_hw: tuple, batch: int = 3) -> bool:
    """Return True when the batched graph gives, for each image of a random batch, the original
    graph's outputs for that image alone (CPU, within float tolerance)."""
    import onnxruntime as ort
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batch, 3, *input_hw)).astype(np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the original's declared output shapes hold for one size only
    single = ort.InferenceSession(str(original), options, providers=["CPUExecutionProvider"])
    multi = ort.InferenceSession(batched, options, providers=["CPUExecutionProvider"])
    name = single.get_inputs()[0].name
    together = multi.run(None, {name: images})
    for i in range(batch):
        alone = single.run(None, {name: images[i:i + 1]})
        for a, b in zip(alone, together):
            if a.size != b[i].size or not np.allclose(a.reshape(b[i].shape), b[i], rtol=1e-4, atol=1e-5):
                return False
    return True


def batched_detector(det_path: Path, cache_dir: Path) -> tuple:
    """Return (path of a batch-capable copy of the detector or None, note for the user).

    The copy is made once per source file (keyed by its SHA-256 and by _BATCHED_EDIT_VERSION)
    in cache_dir/batched/, by one process at a time (a file lock), and proven equal to the
    original on a random batch before it is used; a copy that no longer loads is made again.
    """
    from filelock import FileLock
    target = (cache_dir / "batched" /
              f"{det_path.stem}-{file_sha256(det_path)[:16]}-v{_BATCHED_EDIT_VERSION}.onnx")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if target.is_file() and loads_as_onnx(target):
                return target, f"batched detector: {target}"
            return make_batched_detector(det_path, target)
    except OSError as error:
        return None, f"cannot write {target} ({error}); frames go through the detector one at a time"


def loads_as_onnx(path: Path) -> bool:
    """Return True when a file parses as an ONNX model (a copy cut short by a crash does not)."""
    import onnx
    try:
        onnx.load(str(path))
        return True
    except Exception:  # any parse error: the file is not usable
        return False


def make_batched_detector(det_path: Path, target: Path) -> tuple:
    """Write the batch-capable copy of a detector to target if the edit works and is proven
    equal; return (target or None, note for the user)."""
    import onnx
    model = onnx.load(str(det_path))
    why = make_detector_batchable(model)
    if why is None:
        dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[2:]]
        data = model.SerializeToString()
        if not batch_outputs_match(det_path, data, tuple(d or 128 for d in dims)):
            why = "the edited graph's outputs differ from the original's"
    if why is not None:
        return None, (f"{det_path.name} cannot be made batch-capable ({why}); frames go "
                      f"through the detector one at a time")
    write_bytes_atomic(target, data)
    return target, f"batched detector made from {det_path.name}: {target}"


def load_face_models(settings: Settings, provider_choice: str, threads: int,
                     gpu: GpuSlot | None = None, say=print) -> FaceModels:
    """Return the pack's detector and recognizer, each on the best provider that really loads
    (TensorRT, CUDA, CPU); say() tells what was chosen and why better providers were not."""
    import onnxruntime as ort
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    ort.set_default_logger_severity(ort_log_level())
    det_path, rec_path = classify_pack_models(find_model_pack(settings.MODEL_ROOT,
                                                              settings.MODEL_PACK_NAME))
    chain = provider_chain(provider_choice, ort.get_available_providers())
    say_missing_providers(provider_choice, ort.get_available_providers(), say)
    for problem in load_nvidia_libraries(chain):  # CUDA, cuDNN, TensorRT from pip wheels (gpulibs.py)
        say(problem)
    gpu = gpu or GpuSlot(0, "GPU 0", None)
    det_file, batched = det_path, False
    if settings.FRAMES_ON_DEVICE == "on" or (settings.FRAMES_ON_DEVICE == "auto" and chain[0] != "CPUExecutionProvider"):
        made, note = batched_detector(det_path, Path(settings.TRT_CACHE_DIR))
        say(note)
        det_file, batched = (made, True) if made else (det_path, False)
    det_session, det_provider = open_model(det_file, chain, detector_profile_for(
        det_file, settings, batched), threads, gpu, settings, say)
    rec_chunk = 1 if uses_dynamic_quantization(rec_path) else settings.REC_CHUNK_SIZE
    rec_session, rec_provider = open_model(rec_path, chain, recognizer_profile(
        model_input(rec_path)[0], rec_chunk), threads, gpu, settings, say)
    if rec_provider == "CUDAExecutionProvider" and tensorrt_unsupported_ops(rec_path):
        say(f"{rec_path.name}: ONNX Runtime has no CUDA kernels for its int8 ops (ConvInteger): "
            f"those run on the CPU; an fp32 pack such as buffalo_l is faster on a GPU")
    recognizer = ArcFaceONNX(model_file=str(rec_path), session=rec_session)
    models = face_models(det_path, det_file, det_session, batched, recognizer, rec_path,
                         1 if rec_chunk == 1 else 1 << 30, gpu)
    device_type = device_for(det_provider, rec_provider, settings.FRAMES_ON_DEVICE, say)
    if device_type is not None:
        try:
            models.device = DeviceGraphs(models, device_type, gpu.id, threads, say)
        except BadInput as error:
            say(f"frames stay on the CPU: {error}")
    return models


def say_missing_providers(choice: str, available: list, say) -> None:
    """Say why each GPU provider asked for is not in this onnxruntime build: always for
    --providers tensorrt|cuda, and for auto when a GPU is there (else a CPU machine is fine)."""
    missing = [p for p in PROVIDER_ORDER[choice] if p not in available and p != "CPUExecutionProvider"]
    if missing and (choice != "auto" or visible_gpus()):
        for provider in missing:
            say(f"{provider} cannot be used: {provider_load_problem(provider)}")


def detector_profile_for(det_file: Path, settings: Settings, batched: bool) -> dict:
    """Return the TensorRT profile of this detector file for this run's batch and box sizes."""
    name, dims, output_count = model_input(det_file)
    strides = _SCRFD_LAYOUTS.get(output_count, ((32,),))[0]
    return detector_profile(name, dims, settings.BATCH_SIZE if batched else 1,
                            detector_box_size(settings), max(strides))


def device_for(det_provider: str, rec_provider: str, choice: str, say) -> str | None:
    """Return where the frames go for the device path ('cuda' or 'cpu'), or None to keep the
    CPU path (FRAMES_ON_DEVICE off, or auto without a GPU, or models on different devices)."""
    gpu = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}
    if choice == "off" or (choice == "auto" and det_provider not in gpu):
        return None
    if (det_provider in gpu) != (rec_provider in gpu):
        say(f"the detector runs on {det_provider} but the recognizer on {rec_provider}: frames "
            f"stay on the CPU")
        return None
    return "cuda" if det_provider in gpu else "cpu"


def face_models(det_path: Path, det_file: Path, det_session, batched: bool, recognizer,
                rec_path: Path, rec_max_chunk: int, gpu: GpuSlot) -> FaceModels:
    """Return FaceModels for opened sessions; raise BadInput for a detector that is not SCRFD."""
    outputs = det_session.get_outputs()
    if len(outputs) not in _SCRFD_LAYOUTS:
        raise BadInput(f"{det_path}: unknown detector layout, {len(outputs)} outputs with shapes "
                       f"{[o.shape for o in outputs]}; expected SCRFD with 6, 9, 10 or 15")
    strides, anchors, has_kps = _SCRFD_LAYOUTS[len(outputs)]
    if not has_kps:
        raise BadInput(f"{det_path}: this SCRFD model has no keypoints; faces cannot be aligned")
    shape = det_session.get_inputs()[0].shape
    fixed = (shape[3], shape[2]) if all(isinstance(v, int) for v in shape[2:4]) else None
    return FaceModels(
        det_session=det_session, det_input_name=det_session.get_inputs()[0].name,
        det_output_names=[o.name for o in outputs], det_strides=strides, det_anchors=anchors,
        det_fixed_size=fixed, rec_session=recognizer.session, rec_input_name=recognizer.input_name,
        rec_mean=recognizer.input_mean, rec_std=recognizer.input_std,
        providers={det_path.name: det_session.get_providers(),
                   rec_path.name: recognizer.session.get_providers()},
        rec_max_chunk=rec_max_chunk, det_path=str(det_path), rec_path=str(rec_path),
        det_batched=batched, det_file=str(det_file), gpu=gpu)
