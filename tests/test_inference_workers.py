"""Section 4, Inference workers: model loading, SCRFD decoding, alignment and embeddings."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import MODEL_PACK, MODEL_ROOT, SHARED, TESTDATA, VIDEOS

PACK_DIR = MODEL_ROOT / "models" / MODEL_PACK
DETECTORS = [PACK_DIR / "det_500m.onnx", SHARED / "models" / "extra" / "scrfd_2.5g_kps_640.onnx"]


def sample_images(main_module) -> list:
    """Reference photos plus a few frames of each shared video (BGR)."""
    images = [main_module.read_image(p) for p in sorted((TESTDATA / "refs").glob("*.jpg"))]
    for path in VIDEOS:
        info = main_module.probe_video(path, 0, path.stem)
        images += [img for i, _, img in main_module.decode_frames(info, 37)][:3]
    return images


@pytest.fixture(scope="module")
def images(main_module):
    return sample_images(main_module)


def pack_with(tmp_path: Path, detector: Path) -> Path:
    """A model root whose pack links the given detector and the shared recognizer."""
    pack = tmp_path / "models" / "testpack"
    pack.mkdir(parents=True)
    os.symlink(detector, pack / detector.name)
    os.symlink(PACK_DIR / "w600k_mbf_int8.onnx", pack / "w600k_mbf_int8.onnx")
    return tmp_path


@pytest.mark.parametrize("detector", DETECTORS, ids=[d.name for d in DETECTORS])
def test_detections_equal_insightface_scrfd_detect(main_module, images, tmp_path, detector):
    """Our SCRFD decoding finds the same faces as insightface's SCRFD.detect, boxes within 1 px."""
    from insightface.model_zoo import model_zoo
    root = pack_with(tmp_path, detector)
    settings = main_module.load_settings(["--model-root", str(root), "--model-pack", "testpack",
                                          "--det-prob-threshold", "0.3"])
    ours = main_module.load_face_models(settings, "cpu", 1)
    theirs = model_zoo.get_model(str(detector), providers=["CPUExecutionProvider"])
    theirs.prepare(-1, input_size=(640, 640), det_thresh=0.3)
    total = 0
    for n, image in enumerate(images):
        boxes, kps = main_module.detect_faces(ours, [image], settings)[0]
        input_size = main_module.detector_input_size(ours, settings, image.shape[:2])
        ref_boxes, ref_kps = theirs.detect(image, input_size=input_size)
        assert len(boxes) == len(ref_boxes), f"image {n}: {len(boxes)} faces vs {len(ref_boxes)}"
        if len(boxes):
            assert np.abs(boxes[:, :4] - ref_boxes[:, :4]).max() <= 1.0, f"image {n} boxes differ"
            assert np.abs(boxes[:, 4] - ref_boxes[:, 4]).max() <= 1e-4, f"image {n} scores differ"
            assert np.abs(kps - ref_kps).max() <= 1.0, f"image {n} keypoints differ"
        total += len(boxes)
    assert total >= len(images), f"only {total} faces in {len(images)} images: the test saw too little"


def test_trimmed_detector_input_finds_the_same_faces_as_the_full_square(main_module, images,
                                                                       cpu_models, test_settings):
    """Feeding a 16:9 frame as 640x384 instead of 640x640 (same scale) finds the same faces."""
    import dataclasses
    square = dataclasses.replace(cpu_models, det_fixed_size=(640, 640))
    compared = 0
    for n, image in enumerate(images):
        trimmed_size = main_module.detector_input_size(cpu_models, test_settings, image.shape[:2])
        boxes, _ = main_module.detect_faces(cpu_models, [image], test_settings)[0]
        full, _ = main_module.detect_faces(square, [image], test_settings)[0]
        assert len(boxes) == len(full), f"image {n} at {trimmed_size}: {len(boxes)} vs {len(full)} faces"
        if len(boxes):  # scores differ slightly, so compare each box with its nearest twin
            nearest = main_module.box_iou(boxes[:, :4], full[:, :4]).argmax(axis=1)
            # In detector pixels: within 1 px; 3 px for a face cut by the frame's bottom or right
            # edge, where the network sees the end of the picture instead of black padding.
            scale = 640 / max(image.shape[:2])  # the letterbox scale into 640x640
            diff = np.abs(boxes[:, :4] - full[nearest, :4]).max(axis=1) * scale
            at_edge = (boxes[:, 3] >= image.shape[0] - 2) | (boxes[:, 2] >= image.shape[1] - 2)
            allowed = np.where(at_edge, 3.0, 1.0)
            assert (diff <= allowed).all(), f"image {n} at {trimmed_size}: {diff.round(2)} px vs {allowed}"
        compared += trimmed_size != (640, 640)
    assert compared >= 5, f"only {compared} images had a trimmed input"


def test_unknown_detector_layout_is_refused_naming_the_file(main_module, tmp_path):
    """A 'detector' whose output count is not an SCRFD layout raises BadInput naming it."""
    yunet = SHARED / "models" / "extra" / "face_detection_yunet_2026may.onnx"
    root = pack_with(tmp_path, yunet)
    settings = main_module.load_settings(["--model-root", str(root), "--model-pack", "testpack"])
    with pytest.raises(main_module.BadInput, match="face_detection_yunet"):
        main_module.load_face_models(settings, "cpu", 1)


def test_similarity_transform_matches_scikit_image(main_module):
    """The Umeyama fit equals scikit-image's SimilarityTransform on random 5-point sets."""
    from skimage.transform import SimilarityTransform
    rng = np.random.default_rng(7)
    template = main_module._ARCFACE_TEMPLATE_PX
    for _ in range(50):
        angle, scale = rng.uniform(-0.8, 0.8), rng.uniform(0.3, 4)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        src = template @ rotation.T * scale + rng.uniform(0, 500, 2) + rng.normal(0, 2, (5, 2))
        ours = main_module.similarity_transform(src, template)
        if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
            reference = SimilarityTransform.from_estimate(src, template)
        else:
            reference = SimilarityTransform()
            reference.estimate(src, template)
        assert np.allclose(ours, reference.params[:2], atol=1e-9), (ours, reference.params[:2])


def test_aligned_crop_matches_insightface_norm_crop(main_module, images, cpu_models, test_settings):
    """align_face gives insightface's norm_crop within 1 grey level, on real faces."""
    from insightface.utils import face_align
    checked = 0
    for image in images[:6]:
        _, kps = main_module.detect_faces(cpu_models, [image], test_settings)[0]
        for points in kps:
            ours = main_module.align_face(image, points).astype(np.int16)
            theirs = face_align.norm_crop(image, points).astype(np.int16)
            assert np.abs(ours - theirs).max() <= 1
            checked += 1
    assert checked >= 6, f"only {checked} faces checked"


def test_embeddings_match_insightface_arcface(main_module, images, cpu_models, test_settings):
    """embed_faces equals insightface's ArcFaceONNX on the same crop (cosine > 0.9999), in any chunk."""
    from insightface.model_zoo import model_zoo
    from insightface.app.common import Face
    from insightface.utils import face_align
    arcface = model_zoo.get_model(str(PACK_DIR / "w600k_mbf_int8.onnx"),
                                  providers=["CPUExecutionProvider"])
    checked = 0
    for image in images[:6]:
        boxes, kps = main_module.detect_faces(cpu_models, [image], test_settings)[0]
        crops = [face_align.norm_crop(image, k) for k in kps]
        ours = main_module.embed_faces(cpu_models, crops, chunk_size=1)
        ours_aligned = main_module.embed_faces(
            cpu_models, [main_module.align_face(image, k) for k in kps], chunk_size=1)
        assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
        for row, own, box, points in zip(ours, ours_aligned, boxes, kps):
            face = Face(bbox=box[:4], kps=points, det_score=box[4])
            arcface.get(image, face)
            assert float(row @ face.normed_embedding) > 0.9999
            # The int8 recognizer is sensitive: a crop 1 grey level off in a few pixels moves
            # the embedding by ~0.002 cosine, far less than the gap between people (~0.3).
            assert float(own @ face.normed_embedding) > 0.99
            checked += 1
    assert checked >= 6, f"only {checked} faces checked"


def test_embeddings_do_not_depend_on_what_else_is_in_the_chunk(main_module, images, cpu_models,
                                                               test_settings):
    """A face's embedding is the same whether embedded alone or with 31 others (int8 model too)."""
    crops = []
    for image in images:
        _, kps = main_module.detect_faces(cpu_models, [image], test_settings)[0]
        crops += [main_module.align_face(image, k) for k in kps]
    assert len(crops) >= 8, f"only {len(crops)} faces"
    alone = main_module.embed_faces(cpu_models, crops, chunk_size=1)
    together = main_module.embed_faces(cpu_models, crops, chunk_size=32)
    worst = float((alone * together).sum(axis=1).min())
    assert worst > 0.9999, f"lowest cosine between the two ways: {worst}"


@pytest.mark.parametrize("root", [MODEL_ROOT, MODEL_ROOT / "models"], ids=["root", "models-folder"])
def test_model_pack_is_found_in_both_layouts(main_module, root):
    """MODEL_ROOT may hold models/<pack>/ (insightface's layout) or <pack>/ directly."""
    assert main_module.find_model_pack(str(root), MODEL_PACK) == root / MODEL_PACK if \
        root.name == "models" else main_module.find_model_pack(str(root), MODEL_PACK) == PACK_DIR


def test_missing_model_pack_names_the_folder_and_files(main_module, tmp_path, monkeypatch):
    """When the pack is missing and cannot be downloaded, the message names the folder and files."""
    import insightface.utils

    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(insightface.utils, "ensure_available", offline)
    with pytest.raises(main_module.BadInput) as caught:
        main_module.find_model_pack(str(tmp_path), "buffalo_l")
    message = str(caught.value)
    assert str(tmp_path / "models" / "buffalo_l") in message and "det_10g.onnx" in message, message


def test_pack_models_are_classified_by_their_graphs(main_module):
    """The detector has >= 5 outputs; the recognizer takes a square 112 px input."""
    detector, recognizer = main_module.classify_pack_models(PACK_DIR)
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
    detector, recognizer = main_module.classify_pack_models(tmp_path)
    assert (detector.name, recognizer.name) == ("det_10g.onnx", "w600k_r50.onnx")


@pytest.mark.parametrize("choice, available, expected", [
    ("auto", ["CPUExecutionProvider"], ["CPUExecutionProvider"]),
    ("auto", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
     ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("cuda", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
     ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
    ("tensorrt", ["CPUExecutionProvider"], ["CPUExecutionProvider"]),
])
def test_provider_candidates_are_the_best_available_first(main_module, choice, available, expected):
    """--providers picks the available providers in order TensorRT, CUDA, CPU; CPU is always last."""
    got = main_module.provider_candidates(choice, available, Path("cache"))
    assert [name for name, _ in got] == expected, got


def test_tensorrt_caches_engines_in_the_cache_folder(main_module):
    """TensorRT is asked for fp16 and for engine and timing caches in TRT_CACHE_DIR."""
    got = dict(main_module.provider_candidates("auto", ["TensorrtExecutionProvider"], Path("c")))
    options = got["TensorrtExecutionProvider"]
    assert options["trt_fp16_enable"] and options["trt_engine_cache_enable"]
    assert options["trt_engine_cache_path"] == "c" and options["trt_timing_cache_path"] == "c"


def test_models_report_the_provider_they_really_run_on(cpu_models):
    """The loaded models report ONNX Runtime's active providers, here the CPU."""
    assert cpu_models.providers == {"det_500m.onnx": ["CPUExecutionProvider"],
                                    "w600k_mbf_int8.onnx": ["CPUExecutionProvider"]}


def test_upscale_factor_enlarges_the_detector_input(main_module, cpu_models):
    """PRE_UPSCALE_FACTOR 1.5 turns a 640x640 detector input into 960x960 (multiples of 32)."""
    settings = main_module.load_settings(["--pre-upscale-factor", "1.5"])
    assert main_module.detector_input_size(cpu_models, settings) == (960, 960)
