"""Section 4, Inference workers: model loading, SCRFD decoding, alignment and embeddings."""
from __future__ import annotations

import os
import re
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


def assert_same_faces(found: tuple, reference: tuple, px: float, score: float, what: str) -> None:
    """Assert two (boxes, kps) detections hold the same faces: boxes and keypoints within px,
    scores within score."""
    assert len(found[0]) == len(reference[0]), f"{what}: {len(found[0])} vs {len(reference[0])} faces"
    if len(reference[0]):
        assert np.abs(found[0][:, :4] - reference[0][:, :4]).max() <= px, f"{what}: boxes"
        assert np.abs(found[0][:, 4] - reference[0][:, 4]).max() <= score, f"{what}: scores"
        assert np.abs(found[1] - reference[1]).max() <= px, f"{what}: keypoints"


def batched_models(main_module, tmp_path: Path, detector: Path, batch: int):
    """(settings, models) with the batch-capable copy of a detector (made in tmp_path)."""
    root = pack_with(tmp_path, detector)
    settings = main_module.load_settings([
        "--model-root", str(root), "--model-pack", "testpack", "--providers", "cpu",
        "--frames-on-device", "on", "--batch-size", str(batch), "--trt-cache-dir", str(tmp_path / "c")])
    return settings, main_module.load_face_models(settings, "cpu", 1, say=lambda text: None)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("detector", DETECTORS, ids=[d.name for d in DETECTORS])
def test_batched_detections_equal_each_frames_own(main_module, images, tmp_path, detector, batch,
                                                 cpu_models, test_settings):
    """For every frame, the batch-capable detector run on batches of 1, 3 and 8 frames finds the
    same faces as the original detector on that frame alone: same count, boxes and keypoints
    within 0.01 px, scores within 1e-4 (issue #4, item 3)."""
    settings, models = batched_models(main_module, tmp_path, detector, batch)
    assert models.det_batched and models.det_file != models.det_path, models.det_file
    alone_models = main_module.load_face_models(
        main_module.load_settings(["--model-root", str(tmp_path), "--model-pack", "testpack",
                                   "--frames-on-device", "off"]), "cpu", 1, say=lambda text: None)
    frames = images * 2  # enough frames of each size for full batches of 8 and a short last one
    together = main_module.detect_faces(models, frames, settings)
    faces = 0
    for n, frame in enumerate(frames):
        alone = main_module.detect_faces(alone_models, [frame], settings)[0]
        assert_same_faces(together[n], alone, 0.01, 1e-4, f"frame {n}")
        faces += len(alone[0])
    assert faces >= len(frames), f"only {faces} faces in {len(frames)} frames: the test saw too little"


def test_batched_detector_copy_is_made_once_per_source_file(main_module, tmp_path):
    """The batch-capable copy is keyed by the source file's SHA-256 and reused, not remade; a copy
    that no longer parses is made again."""
    source = PACK_DIR / "det_500m.onnx"
    first, note = main_module.batched_detector(source, tmp_path)
    assert first is not None and main_module.file_sha256(source)[:16] in first.name, note
    made_at = first.stat().st_mtime_ns
    second, _ = main_module.batched_detector(source, tmp_path)
    assert second == first and second.stat().st_mtime_ns == made_at
    first.write_bytes(first.read_bytes()[:1000])  # cut short, as by a crash while it was written
    third, note = main_module.batched_detector(source, tmp_path)
    assert third == first and "made from" in note and main_module.loads_as_onnx(third), note


def test_interleaving_transposes_are_what_the_edit_fixes(main_module, tmp_path):
    """det_500m transposes its heads to [H,W,N,C]: freeing only the batch axis would interleave
    the images' anchors; the edited graph transposes to [N,H,W,C] and reshapes to [N,-1,C]."""
    import onnx
    model = onnx.load(str(PACK_DIR / "det_500m.onnx"))
    before = {tuple(n.attribute[0].ints) for n in model.graph.node if n.op_type == "Transpose"}
    assert before == {(2, 3, 0, 1)}, before
    assert main_module.make_detector_batchable(model) is None
    after = {tuple(n.attribute[0].ints) for n in model.graph.node if n.op_type == "Transpose"}
    assert after == {(0, 2, 3, 1)}, after
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_a_detector_that_cannot_take_a_batch_falls_back_with_a_message(main_module, tmp_path,
                                                                       monkeypatch):
    """A graph whose outputs are not transposed, reshaped heads is left alone with a message;
    so is one whose edited outputs would differ from the original's: frames then go through
    the detector one at a time."""
    tiny_model(tmp_path / "tiny.onnx", 64, 9)
    made, note = main_module.batched_detector(tmp_path / "tiny.onnx", tmp_path / "c")
    assert made is None and "cannot be made batch-capable" in note and "tiny.onnx" in note, note
    monkeypatch.setattr(main_module, "batch_outputs_match", lambda *args: False)
    made, note = main_module.batched_detector(PACK_DIR / "det_500m.onnx", tmp_path / "c2")
    assert made is None and "outputs differ" in note and "one at a time" in note, note
    assert not list((tmp_path / "c2").rglob("*.onnx")), "a copy that failed its check was kept"


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
def test_provider_chain_is_the_best_available_first(main_module, choice, available, expected):
    """--providers picks the available providers in order TensorRT, CUDA, CPU; CPU is always last."""
    assert main_module.provider_chain(choice, available) == expected


def test_a_provider_that_does_not_load_is_skipped_with_its_reason(main_module, monkeypatch, tmp_path):
    """open_session asks for each provider in turn and checks which one the session really uses:
    CUDA 'available' but its library broken (a file that is no shared library) is reported with
    the loader's error, and the model opens on the CPU."""
    import onnxruntime as ort
    broken = tmp_path / "libonnxruntime_providers_cuda.so"
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(main_module, "provider_library", lambda provider: broken)
    said = []
    session, provider = main_module.open_session(
        PACK_DIR / "det_500m.onnx", [("CUDAExecutionProvider", {}), ("CPUExecutionProvider", {})],
        main_module.session_options(1), said.append)
    assert provider == "CPUExecutionProvider" and session.get_providers() == ["CPUExecutionProvider"]
    assert len(said) == 1 and "CUDAExecutionProvider" in said[0], said
    assert "libonnxruntime_providers_cuda.so cannot be loaded" in said[0], said
    assert "invalid ELF header" in said[0] or "too short" in said[0], said


def test_a_provider_missing_from_the_build_says_which_package_to_install(main_module):
    """On a CPU build, CUDA's problem names onnxruntime-gpu as the fix."""
    problem = main_module.provider_load_problem("CUDAExecutionProvider")
    assert "has no CUDAExecutionProvider" in problem and "onnxruntime-gpu" in problem, problem


def test_both_onnxruntime_builds_installed_is_detected(main_module, monkeypatch):
    """onnxruntime and onnxruntime-gpu together are reported with the commands that fix it."""
    monkeypatch.setattr(main_module, "package_version", lambda name: "1.20.0")
    problem = main_module.both_onnxruntime_builds_problem()
    assert problem and "pip uninstall -y onnxruntime onnxruntime-gpu" in problem, problem


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
    before = main_module.engine_cache_key(**BASE_KEY)
    after = main_module.engine_cache_key(**{**BASE_KEY, **change})
    assert before != after, change


def test_engine_cache_key_is_stable_for_the_same_facts(main_module, tmp_path):
    """The same facts give the same key (a second run reuses the engine), whatever the model
    file's path: the key hashes the model's bytes."""
    first = main_module.engine_cache_key(**BASE_KEY)
    assert first == main_module.engine_cache_key(**dict(BASE_KEY))
    assert re.fullmatch(r"[0-9a-f]{16}", first), first
    copy = tmp_path / "elsewhere" / "det_500m.onnx"
    copy.parent.mkdir()
    copy.write_bytes((PACK_DIR / "det_500m.onnx").read_bytes())
    gpu = main_module.GpuSlot(0, "NVIDIA H200", "10.9.0")
    a = main_module.engine_folder(tmp_path / "c", PACK_DIR / "det_500m.onnx", BASE_KEY["profile"], gpu, True)
    b = main_module.engine_folder(tmp_path / "c", copy, BASE_KEY["profile"], gpu, True)
    assert a == b and a.parent == tmp_path / "c", (a, b)


def test_tensorrt_options_have_caches_fp16_and_explicit_profiles(main_module, tmp_path):
    """TensorRT gets its engine folder (engine and timing cache), fp16 and min/opt/max shapes
    that cover batches 1..BATCH_SIZE and every trimmed detector input, from the largest stride
    (one feature cell) up to DET_SIZE."""
    profile = main_module.detector_profile("input.1", [None, 3, None, None], 8, (640, 640), 32)
    options = main_module.tensorrt_options(tmp_path / "e", profile, 1, True)
    assert options["device_id"] == 1 and options["trt_fp16_enable"] is True
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(tmp_path / "e")
    assert options["trt_timing_cache_enable"] and options["trt_timing_cache_path"] == str(tmp_path / "e")
    assert options["trt_profile_min_shapes"] == "input.1:1x3x32x32"
    assert options["trt_profile_opt_shapes"] == "input.1:8x3x640x640"
    assert options["trt_profile_max_shapes"] == "input.1:8x3x640x640"
    five_levels = main_module.detector_profile("input.1", [None, 3, None, None], 8, (640, 640), 128)
    assert main_module.profile_text(five_levels, 0) == "input.1:1x3x128x128"
    fixed = main_module.detector_profile("images", [1, 3, 640, 640], 8, (1280, 1280))
    assert main_module.profile_text(fixed, 0) == "images:1x3x640x640"
    assert main_module.profile_text(fixed, 2) == "images:8x3x640x640"
    rec = main_module.recognizer_profile("input.1", 32)
    assert main_module.profile_text(rec, 0) == "input.1:1x3x112x112"
    assert main_module.profile_text(rec, 2) == "input.1:32x3x112x112"
    with pytest.raises(main_module.BadInput, match="':' or ','"):
        main_module.profile_text({"a:b": rec["input.1"]}, 0)


def test_warmup_is_announced_only_while_no_engine_is_cached(main_module, tmp_path):
    """The first run (empty engine folder) builds; once an engine file is there, it is reused."""
    folder = tmp_path / "det_500m-0123456789abcdef"
    folder.mkdir()
    assert main_module.needs_engine_build(folder)
    (folder / "TensorrtExecutionProvider_TRTKernel_graph_1_0_0_fp16_sm90.engine").write_bytes(b"x")
    assert not main_module.needs_engine_build(folder)


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
    monkeypatch.setattr(main_module, "provider_library_error", lambda provider: None)
    FakeTensorrtSession.calls, FakeTensorrtSession.fail = [], set()
    return FakeTensorrtSession


def open_detector(main_module, settings, gpu):
    """Open det_500m on [TensorRT, CUDA, CPU]; return (session, provider, what was said)."""
    said = []
    profile = main_module.detector_profile("input.1", [1, 3, None, None], 1, (640, 640))
    session, provider = main_module.open_model(
        PACK_DIR / "det_500m.onnx", ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                     "CPUExecutionProvider"], profile, 1, gpu, settings, said.append)
    return session, provider, said


def test_a_tensorrt_engine_is_built_once_then_loaded_on_its_gpu(main_module, fake_tensorrt, tmp_path):
    """First run: WARMUP, the engine is built into a temporary folder that becomes the keyed
    folder only once it works. Second run: no WARMUP, the same folder. Worker 1's GPU id reaches
    TensorRT's and CUDA's options."""
    settings = main_module.load_settings(["--trt-cache-dir", str(tmp_path / "cache")])
    gpu = main_module.GpuSlot(1, "NVIDIA H200", "10.9.0")
    _, provider, said = open_detector(main_module, settings, gpu)
    assert provider == "TensorrtExecutionProvider" and sum("WARMUP" in t for t in said) == 1, said
    folders = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(folders) == 1 and folders[0].name.startswith("det_500m-"), folders
    assert not main_module.needs_engine_build(folders[0]) and ".build-" not in folders[0].name
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
    gpu = main_module.GpuSlot(0, "NVIDIA H200", "10.9.0")
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
    gpu = main_module.GpuSlot(0, "NVIDIA H200", "10.9.0")
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
    monkeypatch.setattr(main_module, "provider_library",
                        lambda p: broken if p.startswith("Tensorrt") else None)
    settings = main_module.load_settings(["--trt-cache-dir", str(tmp_path / "cache")])
    said = []
    _, provider = main_module.open_model(
        PACK_DIR / "det_500m.onnx", ["TensorrtExecutionProvider", "CPUExecutionProvider"],
        {}, 1, main_module.GpuSlot(0, "GPU 0", None), settings, said.append)
    assert provider == "CPUExecutionProvider" and not any("WARMUP" in t for t in said), said
    assert any("TensorrtExecutionProvider cannot be used" in t and "cannot be loaded" in t
               for t in said), said
    assert not (tmp_path / "cache").exists()


def test_int8_models_are_kept_off_tensorrt_with_a_message(main_module, monkeypatch):
    """usable_chain drops TensorRT for the int8 recognizer (ConvInteger), saying why, and keeps
    it for the fp32 detector."""
    monkeypatch.setattr(main_module, "provider_library_error", lambda provider: None)
    chain = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    said = []
    assert main_module.usable_chain(PACK_DIR / "w600k_mbf_int8.onnx", chain, said.append) == chain[1:]
    assert len(said) == 1 and "ConvInteger" in said[0] and "next provider" in said[0], said
    assert main_module.usable_chain(PACK_DIR / "det_500m.onnx", chain, said.append) == chain


def test_device_graphs_run_on_the_workers_gpu(main_module, monkeypatch, cpu_models):
    """The resize, alignment and candidate graphs are put on CUDA with the worker's device id,
    and it is said when they do not really run there."""
    seen = []

    class Fake:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    import onnxruntime as ort
    monkeypatch.setattr(main_module, "graph_session",
                        lambda model, providers, options=None: seen.append((providers, options)) or Fake())
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy",
                        staticmethod(lambda array, device, device_id: ("on", device, device_id)))
    said = []
    graphs = main_module.DeviceGraphs(cpu_models, "cuda", 1, 3, said.append)
    assert len(seen) == 3 and all(p[0] == ("CUDAExecutionProvider", {"device_id": 1}) for p, _ in seen), seen
    assert all(o.intra_op_num_threads == 3 for _, o in seen), "graph sessions must use the worker's threads"
    assert any("not CUDA" in t for t in said), said
    frames = graphs.upload([np.zeros((4, 6, 3), np.uint8)] * 2)
    assert frames.value == ("on", "cuda", 1) and frames.host is None, "no host copy kept on a GPU"


@pytest.mark.parametrize("model, unsupported", [
    (PACK_DIR / "w600k_mbf_int8.onnx", {"ConvInteger", "DynamicQuantizeLinear"}),
    (PACK_DIR / "det_500m.onnx", set()),
    (SHARED / "models" / "extra" / "faceplugin_fr_feature_512.onnx", set()),
])
def test_int8_models_are_kept_off_tensorrt(main_module, model, unsupported):
    """ConvInteger/DynamicQuantizeLinear graphs cannot run on TensorRT: they are found by op."""
    assert main_module.tensorrt_unsupported_ops(model) >= unsupported
    assert bool(main_module.tensorrt_unsupported_ops(model)) == bool(unsupported)


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
    assert main_module.worker_gpu_ids(workers, ids, visible) == expected


def test_a_gpu_id_that_is_not_visible_is_refused_by_name(main_module):
    """GPU_DEVICE_IDS naming GPU 2 on a 2-GPU machine is an error naming the flag and the GPU."""
    with pytest.raises(ValueError, match=r"--gpu-device-ids 0,2: GPU 2 is not visible"):
        main_module.worker_gpu_ids(2, (0, 2), 2)


@pytest.mark.parametrize("env, smi, expected", [
    (None, ["NVIDIA H200, 143771 MiB", "NVIDIA A100, 81920 MiB"], ["NVIDIA H200", "NVIDIA A100"]),
    ("1", ["NVIDIA H200, 143771 MiB", "NVIDIA A100, 81920 MiB"], ["NVIDIA A100"]),
    ("1,0", ["NVIDIA H200, 1 MiB", "NVIDIA A100, 1 MiB"], ["NVIDIA A100", "NVIDIA H200"]),
    ("0,-1,1", ["NVIDIA H200, 1 MiB", "NVIDIA A100, 1 MiB"], ["NVIDIA H200"]),
    ("", ["NVIDIA H200, 1 MiB"], []),
])
def test_visible_gpus_follow_cuda_visible_devices(main_module, monkeypatch, env, smi, expected):
    """CUDA_VISIBLE_DEVICES picks and orders the GPUs workers can use (CUDA stops at -1)."""
    monkeypatch.setattr(main_module, "visible_gpus", lambda: smi)
    if env is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    assert main_module.visible_gpu_names() == expected


def test_models_report_the_provider_they_really_run_on(cpu_models):
    """The loaded models report ONNX Runtime's active providers, here the CPU."""
    assert cpu_models.providers == {"det_500m.onnx": ["CPUExecutionProvider"],
                                    "w600k_mbf_int8.onnx": ["CPUExecutionProvider"]}


def test_upscale_factor_enlarges_the_detector_input(main_module, cpu_models):
    """PRE_UPSCALE_FACTOR 1.5 turns a 640x640 detector input into 960x960 (multiples of 32)."""
    settings = main_module.load_settings(["--pre-upscale-factor", "1.5"])
    assert main_module.detector_input_size(cpu_models, settings) == (960, 960)


# Device-side preprocessing graphs (issue #4, item 4), proven here on ONNX Runtime's CPU provider.
DETECTOR_INPUTS = [(640, 640), (640, 384), (320, 320), (1280, 736), (1920, 1088)]  # (width, height)


@pytest.fixture(scope="module")
def letterbox_session(main_module):
    return main_module.graph_session(main_module.letterbox_graph(), ["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def alignment_session(main_module, cpu_models):
    model = main_module.alignment_graph(cpu_models.rec_mean, cpu_models.rec_std)
    return main_module.graph_session(model, ["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def faces(main_module, images, cpu_models, test_settings) -> list:
    """(image, kps [F,5,2]) for every sample image with at least one face."""
    found = [(image, main_module.detect_faces(cpu_models, [image], test_settings)[0][1])
             for image in images]
    return [(image, kps) for image, kps in found if len(kps)]


def same_size_batches(images: list) -> list:
    """The images stacked into one [N,H,W,3] batch per distinct frame size."""
    shapes = sorted({image.shape for image in images})
    return [np.stack([image for image in images if image.shape == shape]) for shape in shapes]


def norm_crop_blob(image: np.ndarray, kps: np.ndarray, models) -> np.ndarray:
    """insightface's norm_crop crops as the recognizer blob embed_faces builds, [F,3,112,112]."""
    import cv2
    from insightface.utils import face_align
    crops = [face_align.norm_crop(image, points) for points in kps]
    return cv2.dnn.blobFromImages(crops, 1.0 / models.rec_std, (112, 112), (models.rec_mean,) * 3,
                                  swapRB=True)


def cv2_warp_is_float() -> bool:
    """True when cv2.warpAffine samples at exact coordinates, False when it rounds them to 1/32 px."""
    import cv2
    step = np.zeros((4, 8), np.uint8)
    step[:, 4:] = 255
    moved = cv2.warpAffine(step, np.array([[1.0, 0.0, 0.01], [0.0, 1.0, 0.0]]), (8, 4))
    return int(moved[0, 4]) != 255  # 0.01 px is under half of 1/32 px: rounding keeps 255


@pytest.mark.parametrize("input_size", DETECTOR_INPUTS, ids=[f"{w}x{h}" for w, h in DETECTOR_INPUTS])
def test_letterbox_graph_equals_letterbox_within_one_grey_level(main_module, images,
                                                                letterbox_session, input_size):
    """The letterbox graph gives letterbox()'s blob within 1 grey level for a batch of real frames
    (640x360, 844x614, 1920x1080 and the reference photos), down- and upscaled, rounded to whole
    grey levels as cv2.resize does; the padding is exactly normalised black."""
    black = np.float32((0 - main_module._DET_MEAN) / main_module._DET_STD)
    for batch in same_size_batches(images):
        new_w, new_h = main_module.letterbox_size(batch.shape[1:3], input_size)
        blob = letterbox_session.run(None, {"frames": batch, "resized_hw": np.array([new_h, new_w]),
                                            "input_hw": np.array(input_size[::-1])})[0]
        expected = np.concatenate([main_module.letterbox(frame, input_size)[0] for frame in batch])
        assert blob.shape == expected.shape, f"{batch.shape}: {blob.shape} vs {expected.shape}"
        levels = np.abs(blob - expected) * main_module._DET_STD
        print(f"{batch.shape} -> {input_size}: max {levels.max():.3f}, mean {levels.mean():.4f} levels")
        assert levels.max() <= 1.0 + 1e-4, f"{batch.shape} -> {input_size}: {levels.max()} levels"
        grey = blob * main_module._DET_STD + main_module._DET_MEAN
        off_grid = np.abs(grey - np.round(grey)).max()
        assert off_grid <= 1e-3, f"{batch.shape}: values {off_grid} levels from whole grey levels"
        padding = np.concatenate([blob[:, :, new_h:, :].ravel(), blob[:, :, :, new_w:].ravel()])
        assert (padding == black).all(), f"{batch.shape}: padding values {np.unique(padding)[:5]}"


def test_alignment_graph_equals_norm_crop_within_one_grey_level(main_module, faces, cpu_models,
                                                                alignment_session):
    """The alignment graph gives insightface's norm_crop (as the recognizer blob) within 1 grey
    level for all faces of a frame at once (F up to 9), on real faces.

    OpenCV 5.0 warps at exact coordinates (cv2_warp_is_float) and the bound is a strict max of
    1 level (measured: max 1, mean 0.0003, 0.03 % of values 1 level off). Older OpenCV releases
    round source coordinates to 1/32 px (INTER_BITS); emulating that on these faces moved
    0.02 % of values by more than 1 level, at most 3: then 99.9 % within 1 and max 3.
    """
    all_levels = []
    for image, kps in faces:
        crops = alignment_session.run(None, {"frame": image,
                                             "matrices": main_module.alignment_matrices(kps)})[0]
        levels = np.abs(crops - norm_crop_blob(image, kps, cpu_models)) * cpu_models.rec_std
        all_levels.append(levels.ravel())
    levels = np.concatenate(all_levels)
    within_one = float((levels <= 1.0 + 1e-4).mean())
    print(f"{sum(len(k) for _, k in faces)} faces: max {levels.max():.3f}, mean "
          f"{levels.mean():.5f} levels, {within_one:.5%} within 1")
    assert sum(len(k) for _, k in faces) >= 30 and max(len(k) for _, k in faces) >= 8, \
        f"faces per image: {[len(k) for _, k in faces]}"
    max_allowed = 1.0 if cv2_warp_is_float() else 3.0
    assert levels.max() <= max_allowed + 1e-4 and within_one >= 0.999, \
        f"max {levels.max()} levels (allowed {max_allowed}), {within_one:.5%} within 1 level"
    assert levels.mean() <= 0.01, f"mean {levels.mean()} levels"


@pytest.mark.parametrize("corner", ["top-left", "bottom-right"])
def test_alignment_graph_fills_outside_the_frame_with_black_like_norm_crop(
        main_module, faces, cpu_models, alignment_session, corner):
    """A face cut by the frame's edge (about half of its crop outside) is aligned like
    norm_crop: black outside the frame, within 1 grey level (3 where cv2 rounds coordinates, see above)."""
    image, kps = max(faces, key=lambda face: len(face[1]))
    points = kps[np.argmax(np.ptp(kps[:, :, 0], axis=1))]  # the widest face
    x_px, y_px = (int(v) for v in (points.min(axis=0) if corner == "top-left" else points.max(axis=0)))
    if corner == "top-left":
        cut, points = np.ascontiguousarray(image[y_px:, x_px:]), points - [x_px, y_px]
    else:
        cut = np.ascontiguousarray(image[:y_px, :x_px])
    matrices = main_module.alignment_matrices([points])
    crops = alignment_session.run(None, {"frame": cut, "matrices": matrices})[0]
    rows, cols = np.mgrid[:112, :112]
    frame_xy = np.stack([cols, rows, np.ones_like(cols)], axis=-1) @ matrices[0].T
    outside = ((frame_xy < -0.5) | (frame_xy > np.array(cut.shape[1::-1]) - 0.5)).any(axis=-1).mean()
    assert outside >= 0.1, f"only {outside:.1%} of the crop lies outside the frame"
    levels = np.abs(crops - norm_crop_blob(cut, points[None], cpu_models)) * cpu_models.rec_std
    print(f"{corner}: {outside:.1%} outside, max {levels.max():.3f}, mean {levels.mean():.5f} levels")
    max_allowed = 1.0 if cv2_warp_is_float() else 3.0
    assert levels.max() <= max_allowed + 1e-4, f"{corner}: max {levels.max()} levels"


@pytest.fixture(scope="module")
def fp32_models(cpu_models):
    """cpu_models with the fp32 recognizer from shared/models/extra (fixed batch of 1)."""
    import dataclasses
    import onnxruntime as ort
    session = ort.InferenceSession(str(SHARED / "models" / "extra" / "faceplugin_fr_feature_512.onnx"),
                                   providers=["CPUExecutionProvider"])
    return dataclasses.replace(cpu_models, rec_session=session,
                               rec_input_name=session.get_inputs()[0].name, rec_max_chunk=1)


@pytest.mark.parametrize("recognizer, min_cosine", [("fp32", 0.999), ("int8", 0.995)])
def test_embeddings_from_alignment_graph_equal_the_cpu_path(main_module, faces, cpu_models,
                                                            fp32_models, alignment_session,
                                                            recognizer, min_cosine):
    """The recognizer fed the alignment graph's crops gives the embeddings of align_face +
    embed_faces: cosine >= 0.999 with the fp32 recognizer (measured: min 0.999997).

    The int8 recognizer (one face per call) quantizes every layer's activations per call, so the
    0.03 % of values that are 1 grey level off move an embedding by up to 0.004 (measured: min
    0.9960, mean 0.9982 over 43 faces), as much as align_face against norm_crop does (min 0.9964);
    people lie ~0.3 apart.
    """
    models = fp32_models if recognizer == "fp32" else cpu_models
    cosines = []
    for image, kps in faces:
        crops = alignment_session.run(None, {"frame": image,
                                             "matrices": main_module.alignment_matrices(kps)})[0]
        ours = np.concatenate([models.rec_session.run(None, {models.rec_input_name: crop[None]})[0]
                               for crop in crops])
        ours /= np.linalg.norm(ours, axis=1, keepdims=True)
        expected = main_module.embed_faces(
            models, [main_module.align_face(image, points) for points in kps], chunk_size=1)
        cosines += list((ours * expected).sum(axis=1))
    print(f"{recognizer}, {len(cosines)} faces: lowest cosine {min(cosines):.6f}, "
          f"mean {np.mean(cosines):.6f}")
    assert len(cosines) >= 30, f"only {len(cosines)} faces"
    assert min(cosines) >= min_cosine, f"{recognizer}: lowest cosine {min(cosines)} of {len(cosines)}"


def test_alignment_matrices_invert_the_matrices_align_face_uses(main_module, faces):
    """Each matrix maps crop pixels back to the frame: composed with align_face's it is the identity."""
    _, kps = faces[0]
    for points, inverse in zip(kps, main_module.alignment_matrices(kps)):
        forward = main_module.face_matrix(points)
        composed = forward[:, :2] @ inverse.astype(np.float64)
        composed[:, 2] += forward[:, 2]
        assert np.allclose(composed, np.eye(2, 3), atol=1e-4), composed


@pytest.fixture(scope="module")
def device_models(main_module, tmp_path_factory):
    """(settings, models) with FRAMES_ON_DEVICE on, on the CPU: the device path's graphs, IO
    binding and batched detector, exactly as on a GPU but with 'cpu' as the device."""
    cache = tmp_path_factory.mktemp("cache")
    settings = main_module.load_settings([
        "--model-root", str(MODEL_ROOT), "--model-pack", MODEL_PACK, "--providers", "cpu",
        "--frames-on-device", "on", "--batch-size", "4", "--trt-cache-dir", str(cache)])
    said = []
    models = main_module.load_face_models(settings, "cpu", 1, say=said.append)
    assert models.device is not None and models.det_batched, said
    assert any("frames go to the CPU once" in line for line in said), said
    return settings, models


def test_device_path_detects_the_faces_the_cpu_path_detects(main_module, images, device_models,
                                                           cpu_models, test_settings):
    """Frames uploaded once, letterboxed by the graph and detected through IO binding give the
    CPU path's faces: same count, boxes and keypoints within 1 px, scores within 0.01 (the
    graph's resize is within 1 grey level of cv2's)."""
    settings, models = device_models
    found, handles = main_module.detect_on_device(models, images, settings)
    faces = 0
    for n, image in enumerate(images):
        reference = main_module.detect_faces(cpu_models, [image], test_settings)[0]
        assert_same_faces(found[n], reference, 1.0, 0.01, f"image {n}")
        frames, index = handles[n]
        assert frames.host[index].shape == image.shape and np.array_equal(frames.host[index], image)
        faces += len(reference[0])
    assert faces >= len(images), f"only {faces} faces: the test saw too little"


def test_device_looks_embed_like_the_cpu_path(main_module, images, device_models, cpu_models,
                                              test_settings):
    """Faces aligned and recognised on the device from the uploaded frame embed like align_face +
    embed_faces on the CPU: cosine >= 0.995 with the int8 recognizer (it quantizes each call, so
    a pixel one grey level off moves it by ~0.001; see the alignment-graph test)."""
    settings, models = device_models
    found, handles = main_module.detect_on_device(models, images[:6], settings)
    looks, crops = [], []
    for (boxes, kps), handle, image in zip(found, handles, images[:6]):
        for points in kps:
            looks.append(main_module.DeviceLook(*handle, points))
            crops.append(main_module.align_face(image, points))
    assert len(looks) >= 6, f"only {len(looks)} faces"
    on_device = main_module.embed_looks(models, looks, 32)
    on_cpu = main_module.embed_faces(cpu_models, crops, 32)
    cosines = (on_device * on_cpu).sum(axis=1)
    assert cosines.min() >= 0.995, f"lowest cosine {cosines.min():.5f} over {len(looks)} faces"
    assert np.allclose(np.linalg.norm(on_device, axis=1), 1.0, atol=1e-5)


def test_a_finished_video_lets_go_of_its_frames_on_the_device(main_module, device_models, tmp_path):
    """After a video's end marker, its sequencer and tracker are dropped and no frame batch of it
    stays uploaded (a folder of many videos must not pile up device memory)."""
    import gc
    import queue as queues
    import weakref
    settings, models = device_models
    values = dict(settings.values, OUTPUT_DIR=str(tmp_path / "out"), CUSTOM_THRESHOLD=0.7)
    settings = main_module.Settings(tuple(values.items()))
    path = TESTDATA / "videos" / "obama_whcd.mp4"
    info = main_module.probe_video(path, 0, "obama_whcd")
    frames = [image for _, _, image in main_module.decode_frames(info, 6)][:8]
    ring = np.zeros((len(frames), info.height, info.width, 3), np.uint8)
    embedding, _ = main_module.embed_reference_photo(TESTDATA / "refs" / "Barack_Obama.jpg", models, settings)
    reference = main_module.Reference("Barack_Obama", ["x"], embedding[None])
    results, free = queues.Queue(), queues.Queue()
    context = main_module.WorkerContext(settings, ring, [info], *main_module.reference_matrix([reference]),
                                        ["Barack_Obama"], models, free, results)
    items = []
    for seq, image in enumerate(frames):
        ring[seq] = image
        items.append((0, seq, seq * 6, seq * 0.4, info.height, info.width, seq))
    uploaded = []
    real_upload = models.device.upload
    models.device.upload = lambda images: uploaded.append(real_upload(images)) or uploaded[-1]
    try:
        main_module.process_batch(context, items[:4])
        main_module.process_batch(context, [*items[4:], (0, len(frames), None, None, 0, 0, None)])
    finally:
        models.device.upload = real_upload
    assert len(uploaded) == 2, f"{len(uploaded)} uploads for 2 batches"
    refs = [weakref.ref(frames_on_device) for frames_on_device in uploaded]
    del uploaded
    gc.collect()
    assert context.sequencers == {}, "the finished video's sequencer is still kept"
    assert all(r() is None for r in refs), "an uploaded batch of a finished video is still referenced"
    kinds = [m[0] for m in list(results.queue)]
    assert kinds.count("progress") == len(frames) and "video_tracked" in kinds, kinds
    assert any(m[0] == "track" and m[2]["name"] == "Barack_Obama" for m in list(results.queue)), kinds
    assert free.qsize() == len(frames), "every ring slot was returned"


@pytest.mark.parametrize("count", [1000, 20])
def test_the_best_anchors_from_the_device_decode_like_all_outputs(main_module, images, cpu_models,
                                                                 test_settings, count):
    """The candidate graph keeps each frame's best anchors on the device; decoding them gives
    exactly what decoding every output gives. With only 20 kept and more above the threshold,
    the frame's whole outputs are fetched instead (both ways are taken here)."""
    import onnxruntime as ort
    models = cpu_models
    ranks = [len(o.shape) for o in models.det_session.get_outputs()]
    graph = main_module.candidates_graph(models.det_output_names, ranks, count)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    fetched = []

    class Whole:  # what the device would hand back: an OrtValue-like output
        def __init__(self, array):
            self.array = array

        def numpy(self):
            fetched.append(1)
            return self.array

    for n, image in enumerate(images):
        size = main_module.detector_input_size(models, test_settings, image.shape[:2])
        blob, scale = main_module.letterbox(image, size)
        outputs = models.det_session.run(models.det_output_names, {models.det_input_name: blob})
        chosen = session.run(None, dict(zip(models.det_output_names, outputs)))
        got = main_module.decode_device_detections(models, [Whole(o) for o in outputs], chosen, 0,
                                                    size, scale, test_settings.det_prob_threshold)
        want = main_module.decode_scrfd(outputs, models.det_strides, models.det_anchors, size, scale,
                                        test_settings.det_prob_threshold)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), f"image {n}"
    if count == 20:  # 5 of these frames have more than 20 anchors above the threshold
        assert 0 < len(fetched) < 9 * len(images), f"the whole outputs were fetched {len(fetched)} times"
    else:
        assert fetched == [], "with 1000 candidates no frame here needs its whole outputs"


def test_batched_device_detections_decode_exactly_like_all_outputs(main_module, images, device_models):
    """For every frame of a batch on the device (not only the first), the best anchors decode
    exactly as all of that frame's outputs do."""
    settings, models = device_models
    same_size = [image for image in images if image.shape == images[-1].shape][:4]
    assert len(same_size) >= 2, "the test needs a batch"
    size = main_module.detector_input_size(models, settings, same_size[0].shape[:2])
    frames = models.device.upload(same_size)
    blob, scale = models.device.blob(frames, size)
    outputs, chosen = models.device.detector_outputs(blob, 0, len(same_size), size)
    whole = [o.numpy() for o in outputs]
    for j in range(len(same_size)):
        got = main_module.decode_device_detections(models, outputs, chosen, j, size, scale,
                                                    settings.det_prob_threshold)
        want = main_module.decode_scrfd([o[j] for o in whole], models.det_strides, models.det_anchors,
                                        size, scale, settings.det_prob_threshold)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), f"frame {j}"
        assert len(want[0]) > 0 or j > 0, "the test saw no face"


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
    monkeypatch.setattr(main_module, "visible_gpus", lambda: gpus)
    heard = []
    main_module.say_missing_providers(choice, ["CPUExecutionProvider"], heard.append)
    assert [t.split(" ")[0] for t in heard] == said, heard
    assert all("pip install onnxruntime-gpu" in t for t in heard), heard


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
            main_module.ort_log_level()
    else:
        assert main_module.ort_log_level() == level
        assert main_module.session_options(1).log_severity_level == level
