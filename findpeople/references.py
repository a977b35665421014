"""References: the people to look for, from the photos in REFERENCE_DIR.

Runs in the parent before the pipeline starts. In: photos named Name.jpg, Name_2.jpg or kept in a
subfolder Name/ (links followed, each photo used once per person). Out: one `Reference` per
person with the L2-normalised embeddings of the largest face of each usable photo. Bad photos
(unreadable, no face, tiny face, the same face under two names, a dead link) are named with the
fix and left out; the run goes on with the rest.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInput
from .settings import Settings
from .folders import dead_link_message, file_identity, unreadable_folder_message, walk_folder
from .detect import SURE_FACE_SCORE, align_face, detect_faces, embed_faces, face_size_px


_IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}  # what OpenCV reads
_IGNORED_FILES = {".ds_store", "thumbs.db", "desktop.ini", ".gitkeep"}  # system files, not photos
_REF_SMALL_FACE_PX = 56  # a reference face smaller than this (shorter side, half ArcFace's 112 px crop) gets a warning
_SAME_FACE_REF_SIMILARITY = 0.9  # cosine: photos of two labels this alike show the same face




@dataclass
class Reference:
    """The embeddings of one person's reference photos (rows L2-normalised)."""

    name: str
    photos: list
    embeddings: np.ndarray


def reference_label(path: Path, root: Path) -> str:
    """Return the person's label: the subfolder name, or the file stem without a _<n> suffix."""
    relative = path.relative_to(root)
    if len(relative.parts) > 1:
        return relative.parts[0]
    return re.sub(r"_\d+$", "", path.stem) or path.stem


def label_key(label: str) -> str:
    """Return a label as compared for duplicates: case, spaces, '_' and '-' ignored."""
    return re.sub(r"[\s_\-]+", "", label).casefold()


def reference_files(folder: Path) -> tuple:
    """Return ([the files in the folder and its first-level subfolders, sorted, system files left
    out], [problems: dead links, subfolders that cannot be opened], [notes: links to folders not
    followed]); links are followed (folders.walk_folder). Raise BadInput if the folder does not
    exist."""
    if not folder.is_dir():
        raise BadInput(f"reference folder {folder} does not exist: create it and put one photo "
                       f"per person in it, named after the person (e.g. Barack_Obama.jpg)")
    listing = walk_folder(folder, max_depth=1)
    files = sorted(p for p in listing.files
                   if p.name.lower() not in _IGNORED_FILES and not p.name.startswith("._"))
    problems = [f"{dead_link_message(p)} (skipped)" for p in listing.dead_links] + \
        [f"{unreadable_folder_message(p, error, 'the photos')} (skipped)"
         for p, error in listing.unreadable]
    return files, problems, listing.notes


def scan_reference_folder(folder: Path) -> tuple:
    """Return ({label: [photo paths]}, {label: the spellings merged into it}, [files in other
    formats], [problems], [notes]) for the folder and its first-level subfolders (problems and
    notes: see reference_files; a file reached twice under one label is used once, with a note).
    Labels that differ only in case, spaces, '_' or '-' are one person, named by the first
    spelling (files sorted)."""
    files, problems, notes = reference_files(folder)
    photos, spellings, others, first, seen = {}, {}, [], {}, {}
    for path in files:
        if path.suffix.lower() not in _IMAGE_EXTENSIONS:
            others.append(path)
            continue
        spelled = reference_label(path, folder)
        label = first.setdefault(label_key(spelled), spelled)
        try:
            identity = (label, file_identity(path))
        except OSError:  # read_image says why
            identity = (label, str(path))
        if identity in seen:
            notes.append(f"{path}: the same file as {seen[identity]}: used once for {label}")
            continue
        seen[identity] = path
        photos.setdefault(label, []).append(path)
        spellings.setdefault(label, set()).add(spelled)
    return photos, spellings, others, problems, notes


def list_reference_photos(folder: Path) -> dict:
    """Return {label: [photo paths]} (see scan_reference_folder)."""
    return scan_reference_folder(folder)[0]


def reference_folder_notes(spellings: dict, others: list) -> tuple:
    """Return ([skipped files: other formats], [notes: label spellings merged]) of a scan."""
    skipped = [f"{path}: not a supported photo format ({path.suffix or 'no extension'}); "
               f"convert it to .jpg or .png (skipped)" for path in others]
    notes = [f"labels {', '.join(repr(s) for s in sorted(names))} differ only in case, spaces, '_' "
             f"or '-': their photos are used as one person, {label!r}"
             for label, names in spellings.items() if len(names) > 1]
    return skipped, notes


def read_image(path: Path) -> np.ndarray:
    """Return a BGR uint8 image, or raise BadInput naming the file."""
    import cv2
    data = np.fromfile(str(path), dtype=np.uint8)  # handles non-ASCII paths on Windows too
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise BadInput(f"{path}: not a readable image (corrupt or unsupported format); "
                       f"replace it with a .jpg or .png photo")
    return image


def largest_face_index(boxes: np.ndarray) -> int:
    """Return the index of the box with the largest area."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return int(np.argmax(areas))


def load_references(folder: Path, models, settings: Settings) -> tuple:
    """Return ([Reference], [skipped photos], [notes]); embeds the largest face of each photo."""
    from tqdm import tqdm
    photos, spellings, others, problems, notes = scan_reference_folder(folder)
    skipped, merged = reference_folder_notes(spellings, others)
    problems, notes = problems + skipped, notes + merged
    references = []
    bar = tqdm(total=sum(map(len, photos.values())), desc="reference photos", unit="photo",
               leave=False)  # 150 photos take seconds on a CPU
    for label, paths in photos.items():
        embeddings, used = [], []
        for path in paths:
            bar.update()
            try:
                embedding, note = embed_reference_photo(path, models, settings)
            except BadInput as error:
                problems.append(str(error))
                continue
            notes += [note] if note else []
            embeddings.append(embedding)
            used.append(str(path))
        if embeddings:
            references.append(Reference(label, used, np.stack(embeddings)))
    bar.close()
    return drop_photos_of_the_same_face(references, problems), problems, notes


def embed_reference_photo(path: Path, models, settings: Settings) -> tuple:
    """Return (embedding of the photo's largest sure face, note or None); raise BadInput naming
    the photo when it is unreadable, shows no face, or the face is too small to recognise."""
    image = read_image(path)
    boxes, kps = detect_faces(models, [image], settings)[0]
    sure = boxes[:, 4] >= SURE_FACE_SCORE  # a big doubtful detection must not win
    if sure.any():
        boxes, kps = boxes[sure], kps[sure]
    if len(boxes) == 0:
        raise BadInput(f"{path}: no face found; use a photo where the face is clearly visible (skipped)")
    pick = largest_face_index(boxes)
    size_px = face_size_px(boxes[pick])
    if size_px < max(settings.MIN_FACE_SIZE, 1):
        raise BadInput(f"{path}: the face is only {size_px:.0f} px, too small to recognise (below "
                       f"MIN_FACE_SIZE {settings.MIN_FACE_SIZE}); use a larger or closer photo (skipped)")
    notes = [f"{len(boxes)} faces found, using the largest"] if len(boxes) > 1 else []
    if size_px < _REF_SMALL_FACE_PX:
        notes.append(f"the face is small ({size_px:.0f} px); a photo with the face at least "
                     f"{_REF_SMALL_FACE_PX} px tall recognises more reliably")
    crop = align_face(image, kps[pick])
    note = f"{path}: {'; '.join(notes)}" if notes else None
    return embed_faces(models, [crop], settings.REC_CHUNK_SIZE)[0], note


def drop_photos_of_the_same_face(references: list, problems: list) -> list:
    """Return the references without photos whose face is another label's (the same photo under
    two names: neither could ever be named, as no match would beat the other by MATCH_MARGIN);
    each dropped photo is added to problems."""
    kept = []
    for reference in references:
        keep = []
        for photo, embedding in zip(reference.photos, reference.embeddings):
            twin = next(((other, p) for other in kept for p, e in zip(other.photos, other.embeddings)
                         if float(e @ embedding) >= _SAME_FACE_REF_SIMILARITY), None)
            if twin is None:
                keep.append((photo, embedding))
            else:
                problems.append(f"{photo} ({reference.name}) shows the same face as {twin[1]} "
                                f"({twin[0].name}): one person under two names can never be told "
                                f"apart; keep the photo under one name (skipped)")
        if keep:
            kept.append(Reference(reference.name, [p for p, _ in keep], np.stack([e for _, e in keep])))
    return kept


def reference_matrix(references: list) -> tuple:
    """Return (embeddings [photos, dim], person index of each photo)."""
    embeddings = np.concatenate([r.embeddings for r in references]).astype(np.float32)
    owners = np.concatenate([np.full(len(r.embeddings), i) for i, r in enumerate(references)])
    return embeddings, owners
