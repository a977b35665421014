"""Models (findpeople/models.py): the pack found in both layouts, detector and recognizer told
apart, the batch-capable detector proven equal, missing providers said."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import DETECTORS, PACK_DIR, assert_same_faces, pack_with
from conftest import MODEL_PACK, MODEL_ROOT, SHARED
from findpeople.detect import detect_faces
from findpeople.errors import BadInput
from findpeople.models import (
    batched_detector, classify_pack_models, find_model_pack, load_face_models, loads_as_onnx,
    make_detector_batchable, say_missing_providers)
from findpeople.providers import file_sha256


def test_unknown_detector_layout_is_refused_naming_the_file(main_module, tmp_path):
    """A 'detector' whose output count is not an SCRFD layout raises BadInput naming it."""
    yunet = SHARED / "models" / "extra" / "face_detection_yunet_2026may.onnx"
    root = pack_with(tmp_path, yunet)
    settings = main_module.load_settings(["--model-root", str(root), "--model-pack", "testpack"])
    with pytest.raises(BadInput, match="face_detection_yunet"):
        load_face_models(settings, "cpu", 1)


def batched_models(main_module, tmp_path: Path, detector: Path, batch: int):
    """(settings, models) with the batch-capable copy of a detector (made in tmp_path)."""
    root = pack_with(tmp_path, detector)
    settings = main_module.load_settings([
        "--model-root", str(root), "--model-pack", "testpack", "--providers", "cpu",
        "--frames-on-device", "on", "--batch-size", str(batch), "--trt-cache-dir", str(tmp_path / "c")])
    return settings, load_face_models(settings, "cpu", 1, say=lambda text: None)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("detector", DETECTORS, ids=[d.name for d in DETECTORS])
def test_batched_detections_equal_each_frames_own(main_module, images, tmp_path, detector, batch,
                                                 cpu_models, test_settings):
    """For every frame, the batch-capable detector run on batches of 1, 3 and 8 frames finds the
    same faces as the original detector on that frame alone: same count, boxes and keypoints
    within 0.01 px, scores within 1e-4 (issue #4, item 3)."""
    settings, models = batched_models(main_module, tmp_path, detector, batch)
    assert models.det_batched and models.det_file != models.det_path, models.det_file
    alone_models = load_face_models(
        main_module.load_settings(["--model-root", str(tmp_path), "--model-pack", "testpack",
                                   "--frames-on-device", "off"]), "cpu", 1, say=lambda text: None)
    frames = images * 2  # enough frames of each size for full batches of 8 and a short last one
    together = detect_faces(models, frames, settings)
    faces = 0
    for n, frame in enumerate(frames):
        alone = detect_faces(alone_models, [frame], settings)[0]
        assert_same_faces(together[n], alone, 0.01, 1e-4, f"frame {n}")
        faces += len(alone[0])
    assert faces >= len(frames), f"only {faces} faces in {len(frames)} frames: the test saw too little"


def test_batched_detector_copy_is_made_once_per_source_file(main_module, tmp_path):
    """The batch-capable copy is keyed by the source file's SHA-256 and reused, not remade; a copy
    that no longer parses is made again."""
    source = PACK_DIR / "det_500m.onnx"
    first, note = batched_detector(source, tmp_path)
    assert first is not None and file_sha256(source)[:16] in first.name, note
    made_at = first.stat().st_mtime_ns
    second, _ = batched_detector(source, tmp_path)
    assert second == first and second.stat().st_mtime_ns == made_at
    first.write_bytes(first.read_bytes()[:1000])  # cut short, as by a crash while it was written
    third, note = batched_detector(source, tmp_path)
    assert third == first and "made from" in note and loads_as_onnx(third), note


def test_interleaving_transposes_are_what_the_edit_fixes(main_module, tmp_path):
    """det_500m transposes its heads to [H,W,N,C]: freeing only the batch axis would interleave
    the images' anchors; the edited graph transposes to [N,H,W,C] and reshapes to [N,-1,C]."""
    import onnx
    model = onnx.load(str(PACK_DIR / "det_500m.onnx"))
    before = {tuple(n.attribute[0].ints) for n in model.graph.node if n.op_type == "Transpose"}
    assert before == {(2, 3, 0, 1)}, before
    assert make_detector_batchable(model) is None
    after = {tuple(n.attribute[0].ints) for n in model.graph.node if n.op_type == "Transpose"}
    assert after == {(0, 2, 3, 1)}, after
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_a_detector_that_cannot_take_a_batch_falls_back_with_a_message(main_module, tmp_path,
                                                                       monkeypatch):
    """A graph whose outputs are not transposed, reshaped heads is left alone with a message;
    so is one whose edited outputs would differ from the original's: frames then go through
    the detector one at a time."""
    tiny_model(tmp_path / "tiny.onnx", 64, 9)
    made, note = batched_detector(tmp_path / "tiny.onnx", tmp_path / "c")
    assert made is None and "cannot be made batch-capable" in note and "tiny.onnx" in note, note
    monkeypatch.setattr("findpeople.models.batch_outputs_match", lambda *args: False)
    made, note = batched_detector(PACK_DIR / "det_500m.onnx", tmp_path / "c2")
    assert made is None and "outputs differ" in note and "one at a time" in note, note
    assert not list((tmp_path / "c2").rglob("*.onnx")), "a copy that failed its check was kept"


@pytest.mark.parametrize("root", [MODEL_ROOT, MODEL_ROOT / "models"], ids=["root", "models-folder"])
def test_model_pack_is_found_in_both_layouts(main_module, root):
    """MODEL_ROOT may hold models/<pack>/ (insightface's layout) or <pack>/ directly."""
    assert find_model_pack(str(root), MODEL_PACK) == root / MODEL_PACK if \
        root.name == "models" else find_model_pack(str(root), MODEL_PACK) == PACK_DIR


def test_missing_model_pack_names_the_folder_and_files(main_module, tmp_path, monkeypatch):
    """When the pack is missing and cannot be downloaded, the message names the folder and files."""
    import insightface.utils

    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(insightface.utils, "ensure_available", offline)
    with pytest.raises(BadInput) as caught:
        find_model_pack(str(tmp_path), "buffalo_l")
    message = str(caught.value)
    assert str(tmp_path / "models" / "buffalo_l") in message and "det_10g.onnx" in message, message


def test_pack_models_are_classified_by_their_graphs(main_module):
    """The detector has >= 5 outputs; the recognizer takes a square 112 px input."""
    detector, recognizer = classify_pack_models(PACK_DIR)
    assert (detector.name, recognizer.name) == ("det_500m.onnx", "w600k_mbf_int8.onnx")


def tiny_model(path: Path, side: int, outputs: int) -> None:
    """Write a minimal ONNX graph with a [1,3,side,side] input and the given output count."""
    import onnx
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Identity", ["input"], [f"out{i}"]) for i in range(outputs)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, side, side])],
        [helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, None) for i in range(outputs)])
    onnx.save(helper.make_model(graph), str(path))


def test_buffalo_l_layout_picks_det_10g_and_w600k_r50(main_module, tmp_path):
    """In buffalo_l's file set the landmark (192 px) and attribute (96 px) models are not taken."""
    for name, side, outputs in [("1k3d68.onnx", 192, 1), ("2d106det.onnx", 192, 1),
                                ("det_10g.onnx", 640, 9), ("genderage.onnx", 96, 1),
                                ("w600k_r50.onnx", 112, 1)]:
        tiny_model(tmp_path / name, side, outputs)
    detector, recognizer = classify_pack_models(tmp_path)
    assert (detector.name, recognizer.name) == ("det_10g.onnx", "w600k_r50.onnx")


def test_models_report_the_provider_they_really_run_on(cpu_models):
    """The loaded models report ONNX Runtime's active providers, here the CPU."""
    assert cpu_models.providers == {"det_500m.onnx": ["CPUExecutionProvider"],
                                    "w600k_mbf_int8.onnx": ["CPUExecutionProvider"]}


@pytest.mark.parametrize("choice, gpus, said", [
    ("cuda", [], ["CUDAExecutionProvider"]),
    ("tensorrt", [], ["TensorrtExecutionProvider", "CUDAExecutionProvider"]),
    ("auto", [], []),  # a CPU machine: nothing to say
    ("auto", ["NVIDIA H200, 143771 MiB"], ["TensorrtExecutionProvider", "CUDAExecutionProvider"]),
    ("cpu", ["NVIDIA H200, 143771 MiB"], []),
])
def test_providers_asked_for_but_missing_from_the_build_are_said(main_module, monkeypatch, choice,
                                                                 gpus, said):
    """--providers cuda|tensorrt on a CPU-only onnxruntime says why each is missing; auto says so
    only when nvidia-smi sees a GPU."""
    monkeypatch.setattr("findpeople.models.visible_gpus", lambda: gpus)
    heard = []
    say_missing_providers(choice, ["CPUExecutionProvider"], heard.append)
    assert [t.split(" ")[0] for t in heard] == said, heard
    assert all("pip install onnxruntime-gpu" in t for t in heard), heard
