"""Detection and embedding on the CPU path: letterbox, SCRFD decoding, NMS, face alignment, ArcFace.

Runs in the worker threads (and for reference photos in the parent). In: BGR frames and the
loaded `FaceModels`. Out: per frame, boxes [N,5] (x1, y1, x2, y2, score) and keypoints [N,5,2] in
frame pixels; per aligned face, an L2-normalised embedding. Pure functions apart from the model
calls, so tests call them directly.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from .settings import Settings

if TYPE_CHECKING:  # annotations only: importing these would make a cycle
    from .models import FaceModels


_NMS_IOU = 0.4  # SCRFD's own non-maximum-suppression overlap
SURE_FACE_SCORE = 0.5  # SCRFD score from which a new track is recognised at once (insightface's default)
DET_MEAN, DET_STD = 127.5, 128.0  # SCRFD input normalisation, RGB
# ArcFace 5-point template for a 112x112 crop. Landmark order: the eye with smaller x, the other
# eye, the nose tip, then the mouth corner with smaller x and the other mouth corner.
_ARCFACE_TEMPLATE_PX = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def detector_input_size(models: FaceModels, settings: Settings, frame_hw: tuple | None = None) -> tuple:
    """Return the (width, height) fed to the detector for frames of this size.

    The frame is scaled to fit DET_SIZE x PRE_UPSCALE_FACTOR exactly as insightface letterboxes
    it, but the input is trimmed to the scaled frame (rounded up to the 32 px SCRFD needs): a
    16:9 frame at 640x640 is fed as 640x384 with the same scale and the same faces, and 40 %
    less work. Models with a fixed input size get that size.
    """
    if models.det_fixed_size:
        return models.det_fixed_size
    box_w, box_h = detector_box_size(settings)
    if frame_hw is None:
        return box_w, box_h
    new_w, new_h = letterbox_size(frame_hw, (box_w, box_h))
    trimmed = min(box_w, -(-new_w // 32) * 32), min(box_h, -(-new_h // 32) * 32)
    # Rounding can, rarely, make the other side the limiting one: then keep the full box.
    return trimmed if letterbox_size(frame_hw, trimmed) == (new_w, new_h) else (box_w, box_h)


def detector_box_size(settings: Settings) -> tuple:
    """Return the (width, height) px box frames are fitted into: DET_SIZE x PRE_UPSCALE_FACTOR,
    in multiples of 32."""
    return tuple(int(round(side * settings.PRE_UPSCALE_FACTOR / 32)) * 32 for side in settings.DET_SIZE)


def letterbox_size(frame_hw: tuple, input_size: tuple) -> tuple:
    """Return the (width, height) a frame is resized to inside the detector input (insightface's rule)."""
    height, width = frame_hw
    input_w, input_h = input_size
    if height / width > input_h / input_w:
        return int(input_h / (height / width)), input_h
    return input_w, int(input_w * (height / width))


def letterbox(image: np.ndarray, input_size: tuple) -> tuple:
    """Return (detector blob [1,3,H,W] float32, scale) with the image resized into the top-left."""
    import cv2
    input_w, input_h = input_size
    height = image.shape[0]
    new_w, new_h = letterbox_size(image.shape[:2], input_size)
    canvas = np.zeros((input_h, input_w, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
    blob = cv2.dnn.blobFromImage(canvas, 1.0 / DET_STD, (input_w, input_h),
                                 (DET_MEAN, DET_MEAN, DET_MEAN), swapRB=True)
    return blob, new_h / height


@lru_cache(maxsize=64)
def anchor_centers(height: int, width: int, stride: int, anchors: int) -> np.ndarray:
    """Return [height*width*anchors, 2] anchor centres (x, y) in detector-input pixels."""
    grid = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32) * stride
    return np.repeat(grid.reshape(-1, 2), anchors, axis=0)


def decode_scrfd(outputs: list, strides: tuple, anchors: int, input_size: tuple,
                 scale: float, threshold: float) -> tuple:
    """Return (boxes [N,5] x1,y1,x2,y2,score, kps [N,5,2]) in frame pixels for one image.

    Outputs come in three groups - scores, box distances, keypoint distances - each with one
    entry per stride, in stride units; a leading batch axis of 1 is accepted.
    """
    level_count, offset = len(strides), 0
    picked, scores, distances, kps = [], [], [], []
    for level in range(level_count):
        level_scores = outputs[level].reshape(-1)
        keep = np.nonzero(level_scores >= threshold)[0]
        picked.append(keep + offset)
        scores.append(level_scores[keep])
        distances.append(outputs[level_count + level].reshape(-1, 4)[keep])
        kps.append(outputs[2 * level_count + level].reshape(-1, 10)[keep])
        offset += level_scores.size
    return decode_candidates(np.concatenate(picked), np.concatenate(scores), np.concatenate(distances),
                             np.concatenate(kps), strides, anchors, input_size, scale)


@lru_cache(maxsize=64)
def anchor_table(strides: tuple, anchors: int, input_size: tuple) -> tuple:
    """Return (centres [A,2], stride of each [A]) of every anchor, levels concatenated in order."""
    centers = [anchor_centers(input_size[1] // s, input_size[0] // s, s, anchors) for s in strides]
    return np.concatenate(centers), np.concatenate([np.full(len(c), s, np.float32)
                                                   for c, s in zip(centers, strides)])


def decode_candidates(anchor_idx: np.ndarray, scores: np.ndarray, distances: np.ndarray,
                      kps: np.ndarray, strides: tuple, anchors: int, input_size: tuple,
                      scale: float) -> tuple:
    """Return decode_scrfd's (boxes, kps) from chosen anchors (indices into anchor_table, in
    increasing order) with their scores and raw box / keypoint distances: sorted by score, NMS."""
    centers, anchor_strides = anchor_table(strides, anchors, input_size)
    centers, stride = centers[anchor_idx], anchor_strides[anchor_idx][:, None]
    distances, kps = distances * stride, kps * stride
    boxes = np.hstack([centers - distances[:, :2], centers + distances[:, 2:]])
    points = kps.reshape(-1, 5, 2) + centers[:, None, :]
    order = np.argsort(-scores, kind="stable")
    boxes = np.hstack([boxes / scale, scores[:, None]])[order]
    points = (points / scale)[order]
    keep = nms(boxes.astype(np.float32), _NMS_IOU)
    return boxes[keep].astype(np.float32), points[keep].astype(np.float32)


def nms(boxes: np.ndarray, iou_threshold: float) -> list:
    """Return indices kept by greedy non-maximum suppression (SCRFD's '+1 pixel' areas)."""
    x1, y1, x2, y2, scores = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        overlap_w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        overlap_h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = overlap_w * overlap_h
        order = rest[inter / (areas[best] + areas[rest] - inter) <= iou_threshold]
    return keep


def detect_faces(models: FaceModels, images: list, settings: Settings) -> list:
    """Return [(boxes [N,5], kps [N,5,2])] per image, in that image's pixels.

    With a batch-capable detector, images of the same detector input size go through it in
    one call (at most BATCH_SIZE at a time); otherwise one at a time.
    """
    sizes = [detector_input_size(models, settings, image.shape[:2]) for image in images]
    results = [None] * len(images)
    for input_size, chunk in batches_by(sizes, settings.BATCH_SIZE if models.det_batched else 1):
        blobs, scales = zip(*(letterbox(images[i], input_size) for i in chunk))
        outputs = models.det_session.run(models.det_output_names,
                                         {models.det_input_name: np.concatenate(blobs)})
        for j, i in enumerate(chunk):
            results[i] = decode_scrfd([o[j] for o in outputs] if models.det_batched else outputs,
                                      models.det_strides, models.det_anchors, input_size,
                                      scales[j], settings.det_prob_threshold)
    return results


def batches_by(keys: list, size: int):
    """Yield (key, [indices]): the indices of equal keys, in order, at most size at a time."""
    groups = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    for key, members in groups.items():
        for start in range(0, len(members), size):
            yield key, members[start:start + size]


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Return the 2x3 least-squares similarity (Umeyama 1991) mapping src points onto dst."""
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.ones(2)
    if np.linalg.det(covariance) < 0:
        signs[1] = -1
    rotation = u @ np.diag(signs) @ vt
    scale = (singular * signs).sum() / src_c.var(axis=0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def face_matrix(kps: np.ndarray, size: int = 112) -> np.ndarray:
    """Return the 2x3 float64 map from frame pixels to ArcFace crop pixels for one face's 5 kps."""
    return similarity_transform(kps.astype(np.float64), _ARCFACE_TEMPLATE_PX * size / 112)


def align_face(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """Return the size x size ArcFace crop for one face's 5 keypoints."""
    import cv2
    return cv2.warpAffine(image, face_matrix(kps, size), (size, size), borderValue=0.0)


def embed_faces(models: FaceModels, crops: list, chunk_size: int) -> np.ndarray:
    """Return L2-normalised embeddings [len(crops), dim] computed chunk_size crops at a time."""
    import cv2
    chunks = []
    chunk_size = min(chunk_size, models.rec_max_chunk)
    for start in range(0, len(crops), chunk_size):
        blob = cv2.dnn.blobFromImages(crops[start:start + chunk_size], 1.0 / models.rec_std,
                                      (112, 112), (models.rec_mean,) * 3, swapRB=True)
        chunks.append(models.rec_session.run(None, {models.rec_input_name: blob})[0])
    return l2_normalised(np.concatenate(chunks))


def l2_normalised(embeddings: np.ndarray) -> np.ndarray:
    """Return float32 rows scaled to length 1 (a zero row stays zero)."""
    embeddings = embeddings.astype(np.float32)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def face_size_px(box) -> float:
    """Return a face's size: the shorter side of its box, in px."""
    return float(min(box[2] - box[0], box[3] - box[1]))
