"""Frames on the device (FRAMES_ON_DEVICE): small ONNX graphs that letterbox, keep the best detector
candidates and align faces on the models' device, chained with IO binding.

Runs in the worker threads when the models run on CUDA/TensorRT (or with --frames-on-device on).
In: a batch of frames from the ring, uploaded once. Out: the same boxes, keypoints and
embeddings as the CPU path in detect.py (proven equal in the tests), and `DeviceLook` handles so
a track's last look can be embedded later without a second upload.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import BadInput
from .settings import Settings
from .providers import provider_load_problem, session_options
from .detect import (
    DET_MEAN, DET_STD, anchor_table, batches_by, decode_candidates, decode_scrfd,
    detector_input_size, embed_faces, face_matrix, l2_normalised, letterbox_size)

if TYPE_CHECKING:  # annotations only: importing these would make a cycle
    from .models import FaceModels


_DEVICE_CANDIDATES = 1000  # anchors per frame brought back from the device (the best scores); when
# all of them pass det_prob_threshold there may be more, and that frame's whole outputs come back


def build_graph_model(name: str, nodes: list, inputs: list, outputs: list, constants: dict):
    """Return a checked onnx.ModelProto from nodes, (name, dtype, shape) in/outputs, constants."""
    import onnx
    from onnx import helper, numpy_helper
    types = {np.uint8: onnx.TensorProto.UINT8, np.int64: onnx.TensorProto.INT64,
             np.float32: onnx.TensorProto.FLOAT}
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(n, types[t], s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, types[t], s) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    # Opset 17 (GridSample needs 16) with its IR version 8, so ONNX Runtime >= 1.17 loads them.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="find-people-in-videos")
    onnx.checker.check_model(model, full_check=True)
    return model


def graph_session(model, providers: list, options=None):
    """Return an ONNX Runtime session running the in-memory model on the given providers."""
    import onnxruntime as ort
    return ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                providers=providers, enable_fallback=0)


def letterbox_graph():
    """Return an ONNX model computing letterbox()'s blob [N,3,input_h,input_w] float32 for N frames.

    Inputs: frames uint8 [N,H,W,3] BGR; resized_hw int64 [2] (new_h, new_w from letterbox_size);
    input_hw int64 [2] (detector input height, width). Resizing happens in NCHW because the CUDA
    provider resizes linearly only over the two innermost axes; it is cv2.resize's INTER_LINEAR
    (half-pixel centres, edge pixels repeated, no antialiasing), rounded to uint8 levels as
    cv2.resize does before normalising. Bilinear values stay within [0, 255], so no Clip is needed.
    The uint8 frames are transposed before they are cast, so the transpose moves a quarter of
    the bytes (the graph runs on the CUDA provider; TensorRT would take uint8 only as an input).
    """
    from onnx import TensorProto, helper
    nodes = [
        helper.make_node("Transpose", ["frames"], ["frames_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["frames_nchw"], ["levels_in"], to=TensorProto.FLOAT),
        helper.make_node("Shape", ["levels_in"], ["batch_channels"], start=0, end=2),
        helper.make_node("Concat", ["batch_channels", "resized_hw"], ["sizes"], axis=0),
        helper.make_node("Resize", ["levels_in", "", "", "sizes"], ["resized"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("Round", ["resized"], ["levels_bgr"]),
        helper.make_node("Gather", ["levels_bgr", "rgb_order"], ["levels_rgb"], axis=1),
        helper.make_node("Sub", ["input_hw", "resized_hw"], ["pad_hw"]),
        helper.make_node("Concat", ["no_padding", "pad_hw"], ["pads"], axis=0),
        helper.make_node("Pad", ["levels_rgb", "pads"], ["canvas"], mode="constant"),
        helper.make_node("Sub", ["canvas", "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "inv_std"], ["blob"]),
    ]
    constants = {"rgb_order": np.array([2, 1, 0], np.int64), "no_padding": np.zeros(6, np.int64),
                 "mean": np.float32(DET_MEAN), "inv_std": np.float32(1.0 / DET_STD)}
    inputs = [("frames", np.uint8, ["N", "H", "W", 3]), ("resized_hw", np.int64, [2]),
              ("input_hw", np.int64, [2])]
    return build_graph_model("letterbox", nodes, inputs,
                             [("blob", np.float32, ["N", 3, "input_h", "input_w"])], constants)


def alignment_matrices(kps_list: list, size: int = 112) -> np.ndarray:
    """Return [F,2,3] float32 maps from crop pixels (u, v, 1) to frame pixels, for alignment_graph.

    These are the inverses of the matrices align_face gives cv2.warpAffine (which inverts them
    itself); pixel centres sit on integer coordinates in both spaces, as in OpenCV.
    """
    inverses = np.zeros((len(kps_list), 2, 3), np.float64)
    for face_idx, kps in enumerate(kps_list):
        matrix = face_matrix(np.asarray(kps), size)
        linear_inverse = np.linalg.inv(matrix[:, :2])
        inverses[face_idx] = np.hstack([linear_inverse, -linear_inverse @ matrix[:, 2:]])
    return inverses.astype(np.float32)


def alignment_grid_nodes(size: int) -> tuple:
    """Return (nodes, constants) turning `matrices` [F,2,3] into GridSample's `grid` [1,size,F*size,2].

    The F crops lie side by side in one sampling grid, so the frame is read once for all faces.
    GridSample with align_corners=0 puts pixel x's centre at (2x + 1) / W - 1.
    """
    from onnx import TensorProto, helper
    rows, cols = np.mgrid[:size, :size]
    crop_uv1 = np.stack([cols.ravel(), rows.ravel(), np.ones(size * size)], axis=1)
    nodes = [
        helper.make_node("Shape", ["frame"], ["frame_hw"], start=0, end=2),
        helper.make_node("Cast", ["frame_hw"], ["frame_hw_px"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["frame_hw_px", "xy_order"], ["frame_wh_px"], axis=0),
        helper.make_node("Div", ["two", "frame_wh_px"], ["grid_scale"]),
        helper.make_node("Div", ["one", "frame_wh_px"], ["half_pixel"]),
        helper.make_node("Sub", ["half_pixel", "one"], ["grid_offset"]),
        helper.make_node("Transpose", ["matrices"], ["matrices_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["crop_uv1", "matrices_t"], ["frame_xy"]),  # [F, size*size, 2]
        helper.make_node("Mul", ["frame_xy", "grid_scale"], ["scaled_xy"]),
        helper.make_node("Add", ["scaled_xy", "grid_offset"], ["grid_per_face"]),
        helper.make_node("Reshape", ["grid_per_face", "face_grid_shape"], ["face_grids"]),
        helper.make_node("Transpose", ["face_grids"], ["rows_faces_cols"], perm=[1, 0, 2, 3]),
        helper.make_node("Reshape", ["rows_faces_cols", "grid_shape"], ["grid"]),
    ]
    constants = {"crop_uv1": crop_uv1.astype(np.float32), "xy_order": np.array([1, 0], np.int64),
                 "two": np.float32(2.0), "one": np.float32(1.0),
                 "face_grid_shape": np.array([-1, size, size, 2], np.int64),
                 "grid_shape": np.array([1, size, -1, 2], np.int64)}
    return nodes, constants


def alignment_graph(mean: float, std: float, size: int = 112):
    """Return an ONNX model: one BGR frame, F crop-to-frame matrices -> recognizer blob [F,3,size,size].

    Inputs: frame uint8 [H,W,3] BGR; matrices float32 [F,2,3] from alignment_matrices.
    Output crops float32: cv2.dnn.blobFromImages(align_face crops, 1/std, (size, size),
    (mean,) * 3, swapRB=True), i.e. bilinear sampling with black outside the frame (warpAffine's
    borderValue=0), rounded to uint8 levels, RGB, then (x - mean) / std.
    """
    from onnx import TensorProto, helper
    grid_nodes, constants = alignment_grid_nodes(size)
    nodes = [
        helper.make_node("Cast", ["frame"], ["levels_hwc"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["levels_hwc"], ["levels_chw"], perm=[2, 0, 1]),
        helper.make_node("Unsqueeze", ["levels_chw", "batch_axis"], ["levels_in"]),
        *grid_nodes,
        helper.make_node("GridSample", ["levels_in", "grid"], ["sampled"], mode="bilinear",
                         padding_mode="zeros", align_corners=0),  # [1, 3, size, F*size]
        helper.make_node("Round", ["sampled"], ["levels_bgr"]),
        helper.make_node("Gather", ["levels_bgr", "rgb_order"], ["levels_rgb"], axis=1),
        helper.make_node("Sub", ["levels_rgb", "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "inv_std"], ["side_by_side"]),
        helper.make_node("Reshape", ["side_by_side", "split_faces"], ["channels_rows_faces"]),
        helper.make_node("Transpose", ["channels_rows_faces"], ["crops"], perm=[2, 0, 1, 3]),
    ]
    constants.update({"batch_axis": np.array([0], np.int64),
                      "rgb_order": np.array([2, 1, 0], np.int64),
                      "mean": np.float32(mean), "inv_std": np.float32(1.0 / std),
                      "split_faces": np.array([3, size, -1, size], np.int64)})
    inputs = [("frame", np.uint8, ["H", "W", 3]), ("matrices", np.float32, ["F", 2, 3])]
    return build_graph_model("alignment", nodes, inputs,
                             [("crops", np.float32, ["F", 3, size, size])], constants)


def candidates_graph(output_names: list, output_ranks: list, count: int):
    """Return an ONNX model that keeps, per image, the `count` anchors with the best scores of an
    SCRFD detector's outputs (its inputs are named like them; three groups of levels): scores
    [N,K], anchor indices [N,K] (into the levels concatenated, as anchor_table), box and
    keypoint distances [N,K,4] and [N,K,10]. K is count, or every anchor when there are fewer."""
    from onnx import helper
    level_count = len(output_names) // 3
    nodes, constants = [], {"k_most": np.array([count], np.int64), "flat": np.array([0, -1], np.int64),
                            "index_axis": np.array([2], np.int64)}
    for group, channels in enumerate((1, 4, 10)):
        for rank in (2, 3):  # [anchors, C] for a batch-1 detector, else [N, anchors, C]
            constants[f"shape_{channels}_{rank}"] = np.array([1 if rank == 2 else 0, -1, channels], np.int64)
        parts = []
        for level in range(level_count):
            i = group * level_count + level
            parts.append(f"level_{i}")
            nodes.append(helper.make_node("Reshape", [output_names[i], f"shape_{channels}_{output_ranks[i]}"],
                                          [parts[-1]]))
        nodes.append(helper.make_node("Concat", parts, [f"all_{channels}"], axis=1))
    nodes += [
        helper.make_node("Reshape", ["all_1", "flat"], ["all_scores"]),
        helper.make_node("Shape", ["all_scores"], ["anchor_count"], start=1, end=2),
        helper.make_node("Min", ["anchor_count", "k_most"], ["k"]),
        helper.make_node("TopK", ["all_scores", "k"], ["cand_scores", "cand_index"], axis=1),
        helper.make_node("Unsqueeze", ["cand_index", "index_axis"], ["index_3d"]),
        helper.make_node("Shape", ["index_3d"], ["batch_k"], start=0, end=2),
    ]
    for channels in (4, 10):
        constants[f"width_{channels}"] = np.array([channels], np.int64)
        nodes += [helper.make_node("Concat", ["batch_k", f"width_{channels}"], [f"gather_shape_{channels}"], axis=0),
                  helper.make_node("Expand", ["index_3d", f"gather_shape_{channels}"], [f"index_{channels}"]),
                  helper.make_node("GatherElements", [f"all_{channels}", f"index_{channels}"],
                                   [f"cand_{'boxes' if channels == 4 else 'kps'}"], axis=1)]
    widths = [c for c in (1, 4, 10) for _ in range(level_count)]
    inputs = [(name, np.float32, ["N", f"anchors_{i}", widths[i]][3 - output_ranks[i]:])
              for i, name in enumerate(output_names)]
    outputs = [("cand_scores", np.float32, ["N", "K"]), ("cand_index", np.int64, ["N", "K"]),
               ("cand_boxes", np.float32, ["N", "K", 4]), ("cand_kps", np.float32, ["N", "K", 10])]
    return build_graph_model("candidates", nodes, inputs, outputs, constants)


@dataclass(frozen=True)
class DeviceFrames:
    """A batch of frames of one size, uploaded once to the models' device (uint8 [N,H,W,3])."""

    value: object  # the OrtValue on the device
    host: np.ndarray | None  # on the CPU device, the array whose memory the value uses
    height: int
    width: int


@dataclass(frozen=True)
class DeviceLook:
    """One face to recognise: frame `index` of an uploaded batch and the face's 5 keypoints."""

    frames: DeviceFrames
    index: int
    kps: np.ndarray


class DeviceGraphs:
    """The letterbox and alignment graphs on the models' device, chained to the detector and the
    recognizer through ONNX Runtime IO binding: each frame is uploaded once, and only the
    detector's outputs and the embeddings come back. Thread-safe (a binding per call)."""

    def __init__(self, models: FaceModels, device_type: str, device_id: int, threads: int, say):
        self.models, self.device_type, self.device_id = models, device_type, device_id
        # On the CUDA provider, not TensorRT: fp16 would blur the alignment grid, and the
        # resize sizes change per video (TensorRT would need a profile per size).
        providers = ([("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
                     if device_type == "cuda" else ["CPUExecutionProvider"])
        self.letterbox = graph_session(letterbox_graph(), providers, session_options(threads))
        self.align = graph_session(alignment_graph(models.rec_mean, models.rec_std), providers,
                                   session_options(threads))
        ranks = [len(o.shape or []) for o in models.det_session.get_outputs()]
        if any(rank not in (2, 3) for rank in ranks):
            raise BadInput(f"{models.det_file}: detector outputs of rank {ranks}, not 2 or 3")
        self.candidates = graph_session(candidates_graph(models.det_output_names, ranks,
                                                         _DEVICE_CANDIDATES), providers, session_options(threads))
        ran_on = self.letterbox.get_providers()[0]
        if device_type == "cuda" and ran_on != "CUDAExecutionProvider":
            say(f"the resize and alignment graphs run on {ran_on}, not CUDA: frames go back and "
                f"forth ({provider_load_problem('CUDAExecutionProvider')})")
        say(f"frames go to the {device_type.upper()} once: resizing, face alignment, detector and "
            f"recognizer run there")

    def upload(self, images: list) -> DeviceFrames:
        """Return the frames (all of one size) copied to the device in one transfer."""
        import onnxruntime as ort
        host = np.ascontiguousarray(np.stack(images))
        value = ort.OrtValue.ortvalue_from_numpy(host, self.device_type, self.device_id)
        # On the CPU device the value uses the host array's memory, which must then live on.
        return DeviceFrames(value, host if self.device_type == "cpu" else None, host.shape[1], host.shape[2])

    def blob(self, frames: DeviceFrames, input_size: tuple):
        """Return the detector input [N,3,H,W] of uploaded frames, left on the device."""
        new_w, new_h = letterbox_size((frames.height, frames.width), input_size)
        binding = self.letterbox.io_binding()
        binding.bind_ortvalue_input("frames", frames.value)
        binding.bind_cpu_input("resized_hw", np.array([new_h, new_w], np.int64))
        binding.bind_cpu_input("input_hw", np.array([input_size[1], input_size[0]], np.int64))
        binding.bind_output("blob", self.device_type, self.device_id)
        self.letterbox.run_with_iobinding(binding)
        return binding.get_outputs()[0], new_h / frames.height

    def detector_outputs(self, blob, first: int, count: int, input_size: tuple) -> tuple:
        """Run the detector on blob[first:first+count] on the device; return (its outputs, left
        there; the best anchors of each image: host arrays scores, indices, box and keypoint
        distances, see candidates_graph)."""
        models = self.models
        binding = models.det_session.io_binding()
        shape = [count, 3, input_size[1], input_size[0]]
        offset_bytes = first * 3 * input_size[0] * input_size[1] * 4  # float32 per image
        binding.bind_input(models.det_input_name, self.device_type, self.device_id, np.float32,
                           shape, blob.data_ptr() + offset_bytes)
        for name in models.det_output_names:
            binding.bind_output(name, self.device_type, self.device_id)
        models.det_session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        choose = self.candidates.io_binding()
        for name, value in zip(models.det_output_names, outputs):
            choose.bind_ortvalue_input(name, value)
        for name in ("cand_scores", "cand_index", "cand_boxes", "cand_kps"):
            choose.bind_output(name, "cpu")
        self.candidates.run_with_iobinding(choose)
        return outputs, choose.copy_outputs_to_cpu()

    def embed(self, frames: DeviceFrames, index: int, matrices: np.ndarray) -> np.ndarray:
        """Return the recognizer's raw embeddings [F, dim] of faces of one uploaded frame."""
        models = self.models
        binding = self.align.io_binding()
        frame_bytes = frames.height * frames.width * 3
        binding.bind_input("frame", self.device_type, self.device_id, np.uint8,
                           [frames.height, frames.width, 3], frames.value.data_ptr() + index * frame_bytes)
        binding.bind_cpu_input("matrices", matrices)
        binding.bind_output("crops", self.device_type, self.device_id)
        self.align.run_with_iobinding(binding)
        recognize = models.rec_session.io_binding()
        recognize.bind_ortvalue_input(models.rec_input_name, binding.get_outputs()[0])
        recognize.bind_output(models.rec_session.get_outputs()[0].name, "cpu")
        models.rec_session.run_with_iobinding(recognize)
        return recognize.copy_outputs_to_cpu()[0]


def detect_on_device(models: FaceModels, images: list, settings: Settings) -> tuple:
    """Return ([(boxes, kps)] per image, [(DeviceFrames, index)] per image): frames of one size
    are uploaded together (BATCH_SIZE at most), resized and detected on the device, and only
    each frame's best anchors come back."""
    results, handles = [None] * len(images), [None] * len(images)
    for frame_hw, chunk in batches_by([image.shape[:2] for image in images], settings.BATCH_SIZE):
        input_size = detector_input_size(models, settings, frame_hw)
        frames = models.device.upload([images[i] for i in chunk])
        blob, scale = models.device.blob(frames, input_size)
        step = len(chunk) if models.det_batched else 1
        for first in range(0, len(chunk), step):
            count = min(step, len(chunk) - first)
            outputs, chosen = models.device.detector_outputs(blob, first, count, input_size)
            whole = []  # the batch's whole outputs, fetched at most once (see below)
            for j in range(count):
                results[chunk[first + j]] = decode_device_detections(
                    models, outputs, chosen, j, input_size, scale, settings.det_prob_threshold, whole)
        for j, i in enumerate(chunk):
            handles[i] = (frames, j)
    return results, handles


def decode_device_detections(models: FaceModels, outputs: list, chosen: list, j: int,
                             input_size: tuple, scale: float, threshold: float,
                             whole: list | None = None) -> tuple:
    """Return image j's (boxes, kps) from its best anchors; if every one of them passes the
    threshold (there may be more), from its whole outputs, fetched from the device into `whole`
    once for the batch."""
    scores, index, distances, kps = (part[j] for part in chosen)
    keep = scores >= threshold
    total = len(anchor_table(models.det_strides, models.det_anchors, input_size)[0])
    if keep.all() and len(scores) < total:
        whole = [] if whole is None else whole
        if not whole:
            whole += [o.numpy() for o in outputs]
        return decode_scrfd([o[j] for o in whole] if models.det_batched else whole,
                            models.det_strides, models.det_anchors, input_size, scale, threshold)
    order = np.argsort(index[keep], kind="stable")  # back to the levels' order, as decode_scrfd
    return decode_candidates(index[keep][order], scores[keep][order], distances[keep][order],
                             kps[keep][order], models.det_strides, models.det_anchors, input_size, scale)


def embed_looks(models: FaceModels, looks: list, chunk_size: int) -> np.ndarray:
    """Return L2-normalised embeddings [len(looks), dim] of aligned crops (CPU path) or of
    DeviceLooks (aligned and recognised on the device, one frame's faces per call)."""
    if not looks or not isinstance(looks[0], DeviceLook):
        return embed_faces(models, looks, chunk_size)
    rows = [None] * len(looks)
    groups = {}
    for i, look in enumerate(looks):
        groups.setdefault((id(look.frames), look.index), []).append(i)
    step = min(chunk_size, models.rec_max_chunk)
    for members in groups.values():
        first = looks[members[0]]
        for start in range(0, len(members), step):
            part = members[start:start + step]
            matrices = alignment_matrices([looks[i].kps for i in part])
            for i, row in zip(part, models.device.embed(first.frames, first.index, matrices)):
                rows[i] = row
    return l2_normalised(np.stack(rows))
