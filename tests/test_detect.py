"""Detection and embedding (findpeople/detect.py): SCRFD decoding equals insightface's, trimmed
detector input, alignment and ArcFace embeddings."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import DETECTORS, PACK_DIR, pack_with
from findpeople.detect import (
    _ARCFACE_TEMPLATE_PX, align_face, detect_faces, detector_input_size, embed_faces,
    similarity_transform)
from findpeople.models import load_face_models
from findpeople.tracks import box_iou


@pytest.mark.parametrize("detector", DETECTORS, ids=[d.name for d in DETECTORS])
def test_detections_equal_insightface_scrfd_detect(main_module, images, tmp_path, detector):
    """Our SCRFD decoding finds the same faces as insightface's SCRFD.detect, boxes within 1 px."""
    from insightface.model_zoo import model_zoo
    root = pack_with(tmp_path, detector)
    settings = main_module.load_settings(["--model-root", str(root), "--model-pack", "testpack",
                                          "--det-prob-threshold", "0.3"])
    ours = load_face_models(settings, "cpu", 1)
    theirs = model_zoo.get_model(str(detector), providers=["CPUExecutionProvider"])
    theirs.prepare(-1, input_size=(640, 640), det_thresh=0.3)
    total = 0
    for n, image in enumerate(images):
        boxes, kps = detect_faces(ours, [image], settings)[0]
        input_size = detector_input_size(ours, settings, image.shape[:2])
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
        trimmed_size = detector_input_size(cpu_models, test_settings, image.shape[:2])
        boxes, _ = detect_faces(cpu_models, [image], test_settings)[0]
        full, _ = detect_faces(square, [image], test_settings)[0]
        assert len(boxes) == len(full), f"image {n} at {trimmed_size}: {len(boxes)} vs {len(full)} faces"
        if len(boxes):  # scores differ slightly, so compare each box with its nearest twin
            nearest = box_iou(boxes[:, :4], full[:, :4]).argmax(axis=1)
            # In detector pixels: within 1 px; 3 px for a face cut by the frame's bottom or right
            # edge, where the network sees the end of the picture instead of black padding.
            scale = 640 / max(image.shape[:2])  # the letterbox scale into 640x640
            diff = np.abs(boxes[:, :4] - full[nearest, :4]).max(axis=1) * scale
            at_edge = (boxes[:, 3] >= image.shape[0] - 2) | (boxes[:, 2] >= image.shape[1] - 2)
            allowed = np.where(at_edge, 3.0, 1.0)
            assert (diff <= allowed).all(), f"image {n} at {trimmed_size}: {diff.round(2)} px vs {allowed}"
        compared += trimmed_size != (640, 640)
    assert compared >= 5, f"only {compared} images had a trimmed input"


def test_similarity_transform_matches_scikit_image(main_module):
    """The Umeyama fit equals scikit-image's SimilarityTransform on random 5-point sets."""
    from skimage.transform import SimilarityTransform
    rng = np.random.default_rng(7)
    template = _ARCFACE_TEMPLATE_PX
    for _ in range(50):
        angle, scale = rng.uniform(-0.8, 0.8), rng.uniform(0.3, 4)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        src = template @ rotation.T * scale + rng.uniform(0, 500, 2) + rng.normal(0, 2, (5, 2))
        ours = similarity_transform(src, template)
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
        _, kps = detect_faces(cpu_models, [image], test_settings)[0]
        for points in kps:
            ours = align_face(image, points).astype(np.int16)
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
        boxes, kps = detect_faces(cpu_models, [image], test_settings)[0]
        crops = [face_align.norm_crop(image, k) for k in kps]
        ours = embed_faces(cpu_models, crops, chunk_size=1)
        ours_aligned = embed_faces(
            cpu_models, [align_face(image, k) for k in kps], chunk_size=1)
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
        _, kps = detect_faces(cpu_models, [image], test_settings)[0]
        crops += [align_face(image, k) for k in kps]
    assert len(crops) >= 8, f"only {len(crops)} faces"
    alone = embed_faces(cpu_models, crops, chunk_size=1)
    together = embed_faces(cpu_models, crops, chunk_size=32)
    worst = float((alone * together).sum(axis=1).min())
    assert worst > 0.9999, f"lowest cosine between the two ways: {worst}"


def test_upscale_factor_enlarges_the_detector_input(main_module, cpu_models):
    """PRE_UPSCALE_FACTOR 1.5 turns a 640x640 detector input into 960x960 (multiples of 32)."""
    settings = main_module.load_settings(["--pre-upscale-factor", "1.5"])
    assert detector_input_size(cpu_models, settings) == (960, 960)
