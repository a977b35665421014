"""Search: match the reference photos against the looks stored in many videos' indexes, fast.

Runs in the parent at search time. In: the references (reference_matrix: L2-normalised photo
embeddings and the person of each photo) and INDEX_DIR's index files (index.py). Out: per video
and track that can possibly be named (one of its looks within CUSTOM_THRESHOLD of a person), the
distance row of every look of the track [looks, people] (naming.person_distances: 1 - similarity
to each person's closest photo), with the looks' frames, times and embeddings, for the naming
rules (naming.py).

How: a cache in INDEX_DIR/search_cache/, derived from the index files and rebuilt for those that
change: per index file a copy of its looks read by row (<name>.<size>-<mtime_ns>.looks.npy), and for all
files one template per track, the normalised mean of its looks in 8 bits (templates.arrow). A
search multiplies every template with the photos (8 bits too, integer products); a track is a
candidate when its template's similarity plus a slack (for how far its looks spread around the
template, and for the rounding) reaches the threshold, and only candidates' looks are matched
exactly. The rounding slack is proven, the spread slack measured on real tracks
(SLACK_PER_SPREAD; docs/benchmark.md, "Index search"). This module owns the cache (every file
written atomically; any of it may be deleted); it only reads the indexes.
"""
from __future__ import annotations

import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .outputs import fsync_file
from .index import INDEX_SUFFIX, IndexProblem, open_index, read_look_rows
from .naming import person_distances


CACHE_DIR_NAME = "search_cache"  # INDEX_DIR/search_cache/: derived from the index files
TEMPLATE_CACHE_NAME = "templates.arrow"
LOOKS_CACHE_SUFFIX = ".looks.npy"
CACHE_FORMAT = 2  # 2: 8-bit templates with a zero point of 128
CACHE_KEY = b"findpeople.search_cache"
# A look's similarity to a photo exceeds its track template's by at most SLACK_PER_SPREAD times
# the track's spread (the largest Euclidean distance of a look from the template). Measured on
# the shared clips' real tracks against every reference photo and, harder, every look of every
# other track as if it were a photo: the largest ratio seen was 0.283 (bench/index_real_tracks.py,
# docs/benchmark.md); 0.35 leaves a quarter more. (Cauchy-Schwarz proves a factor of 1 for any
# data, but lets nearly every track through in 512 dimensions.)
SLACK_PER_SPREAD = 0.35
ROUNDING_SLACK = 1e-4  # float32 sums of float16 looks: far above their rounding
TEMPLATE_BLOCK_ROWS = 65536  # tracks per record batch of templates.arrow
FILTER_THREADS = 2  # threads of the filter's product and of the cache build


@dataclass
class Templates:
    """The track templates of many index files, memory-mapped from the cache (read-only)."""

    files: list  # index file paths, in cache order
    stamps: list  # per file, [size, mtime_ns] its cache was built from
    file_idx: np.ndarray  # [tracks] int32: position in files
    track_id: np.ndarray  # [tracks] int32
    look_start: np.ndarray  # [tracks] int64: first look row of the track in its file
    look_count: np.ndarray  # [tracks] int32
    spread: np.ndarray  # [tracks] float32: largest Euclidean distance of a look from the template
    scale: np.ndarray  # [tracks] float32: template = scale * (codes - 128)
    code_l1: np.ndarray  # [tracks] int32: sum of |codes - 128|, for the rounding bound
    blocks: list  # [rows, dim] uint8 template codes, TEMPLATE_BLOCK_ROWS tracks each
    skipped: dict  # index file name -> why it is not in the cache (damaged, foreign, ...)
    looks: dict = field(default_factory=dict)  # file position -> its LooksFile (open_file_looks)


@dataclass
class TrackLooks:
    """One track that may be named: its looks and their exact distances to every person."""

    index_file: Path
    track_id: int
    frame_idx: np.ndarray  # [looks] int64
    time_s: np.ndarray  # [looks] float64, from the first video frame
    embeddings: np.ndarray  # [looks, dim] float32 (the float16 values stored)
    distances: np.ndarray  # [looks, people] cosine distance, naming.person_distances


def list_index_files(index_dir: Path) -> list:
    """Return the index files (*.parquet, not temporary files) in index_dir, sorted."""
    return sorted(p for p in Path(index_dir).glob(f"*{INDEX_SUFFIX}")
                  if p.is_file() and not p.name.startswith("."))


def file_stamp(path: Path) -> list:
    """Return [size in bytes, modification time in ns] of a file: a rewritten index (a new file
    renamed into place) changes it."""
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


@dataclass(frozen=True)
class LooksFile:
    """Where an index file's cached looks are: a NumPy .npy file of look_dtype records."""

    path: Path
    offset: int  # bytes before the first record
    dtype: np.dtype
    count: int


def looks_cache_path(index_file: Path, stamp: list) -> Path:
    """Return where an index file's looks are cached for this stamp of it (size, mtime in ns):
    search_cache/<name>.<size>-<mtime_ns>.looks.npy beside it."""
    name = f"{index_file.stem}.{stamp[0]}-{stamp[1]}{LOOKS_CACHE_SUFFIX}"
    return index_file.parent / CACHE_DIR_NAME / name


def look_dtype(dim: int) -> np.dtype:
    """Return the record of one cached look (1,044 bytes at 512 values)."""
    return np.dtype([("track_id", "<i4"), ("frame_idx", "<i8"), ("time_s", "<f8"),
                     ("embedding", "<f2", (dim,))])


def track_templates(track_id: np.ndarray, embeddings: np.ndarray) -> dict:
    """Return per track (its looks contiguous, as index files store them): track_id,
    look_start, look_count, spread (largest Euclidean distance of a look from the template), and
    the template (the normalised mean of its looks) as scale * (codes - 128), codes uint8, with
    code_l1 = sum |codes - 128|."""
    dim = embeddings.shape[1]
    if len(track_id) == 0:
        return {"track_id": np.zeros(0, np.int32), "look_start": np.zeros(0, np.int64),
                "look_count": np.zeros(0, np.int32), "spread": np.zeros(0, np.float32),
                "scale": np.zeros(0, np.float32), "code_l1": np.zeros(0, np.int32),
                "codes": np.zeros((0, dim), np.uint8)}
    starts = np.flatnonzero(np.r_[True, track_id[1:] != track_id[:-1]])
    counts = np.diff(np.r_[starts, len(track_id)])
    sums = np.add.reduceat(embeddings.astype(np.float32), starts, axis=0)
    templates = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    deviation = np.linalg.norm(embeddings - np.repeat(templates, counts, axis=0), axis=1)
    scale = np.maximum(np.abs(templates).max(axis=1), 1e-12) / 127
    codes = np.rint(templates / scale[:, None]).astype(np.int16)
    return {"track_id": track_id[starts].astype(np.int32), "look_start": starts.astype(np.int64),
            "look_count": counts.astype(np.int32),
            "spread": np.maximum.reduceat(deviation, starts).astype(np.float32),
            "scale": scale.astype(np.float32), "code_l1": np.abs(codes).sum(axis=1).astype(np.int32),
            "codes": (codes + 128).astype(np.uint8)}


def quantise_photos(ref_embeddings: np.ndarray) -> tuple:
    """Return the photos as the filter multiplies them: (codes [dim, photos] uint8, scale
    [photos], code_l1 [photos]), photo = scale * (codes - 128)."""
    refs = np.asarray(ref_embeddings, np.float32)
    scale = np.maximum(np.abs(refs).max(axis=1), 1e-12) / 127
    codes = np.rint(refs / scale[:, None]).astype(np.int16)
    return (np.ascontiguousarray((codes + 128).astype(np.uint8).T), scale.astype(np.float64),
            np.abs(codes).sum(axis=1).astype(np.float64))


@lru_cache(maxsize=4)
def integer_product_session(threads: int):
    """Return an ONNX Runtime session giving, for uint8 codes [tracks, dim] and photos [dim,
    photos], product = (codes - 128) @ (photos - 128) (exact int32 sums) and best = max over
    photos of (product + photo_add) x photo_scale (float32, per track). MLAS's integer kernels run
    it twice as fast here as NumPy's int8 path (docs/benchmark.md, "Index search")."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    nodes = [helper.make_node("MatMulInteger", ["codes", "photos", "zero", "zero"], ["product"]),
             helper.make_node("Cast", ["product"], ["product_float"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["product_float", "photo_add"], ["shifted"]),
             helper.make_node("Mul", ["shifted", "photo_scale"], ["scaled"]),
             helper.make_node("ReduceMax", ["scaled"], ["best"], axes=[1], keepdims=0)]
    inputs = [helper.make_tensor_value_info("codes", TensorProto.UINT8, ["tracks", "dim"]),
              helper.make_tensor_value_info("photos", TensorProto.UINT8, ["dim", "photos"]),
              helper.make_tensor_value_info("photo_add", TensorProto.FLOAT, ["photos"]),
              helper.make_tensor_value_info("photo_scale", TensorProto.FLOAT, ["photos"])]
    outputs = [helper.make_tensor_value_info("best", TensorProto.FLOAT, ["tracks"]),
               helper.make_tensor_value_info("product", TensorProto.INT32, ["tracks", "photos"])]
    graph = helper.make_graph(nodes, "template_product", inputs, outputs,
                              [onnx.numpy_helper.from_array(np.array(128, np.uint8), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7  # loadable by every onnxruntime this project accepts
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = False  # the arena would keep its largest block after the search
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def read_index_looks(path: Path) -> dict:
    """Return every look of an index file (track_id, frame_idx, time_s, embedding float32);
    raise IndexProblem naming the file when it cannot be read or its looks are out of order."""
    import pyarrow as pa
    parquet, metadata = open_index(path)
    try:
        with closing(parquet):
            looks = read_look_rows(parquet, 0, metadata["look_count"],
                                   ("track_id", "frame_idx", "time_s", "embedding"))
    except (pa.ArrowException, OSError) as error:
        raise IndexProblem(f"{path}: damaged ({error}); the video is indexed again") from None
    if len(looks["track_id"]) and np.any(np.diff(looks["track_id"]) < 0):
        raise IndexProblem(f"{path}: its looks are not sorted by track; the video is indexed again")
    return looks


def write_atomic(path: Path, write) -> None:
    """Write a file with write(binary file) through a uniquely named temporary file, flushed and
    renamed into place (a killed writer leaves the previous file; two writers end with one whole);
    an OSError names the file."""
    part = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "wb") as sink:
            write(sink)
        fsync_file(part)
        os.replace(part, path)
    except BaseException as error:
        part.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
        raise


def write_arrow_atomic(path: Path, schema, batches: list) -> None:
    """Write an Arrow IPC file atomically (write_atomic)."""
    import pyarrow as pa

    def write(sink):
        with pa.ipc.new_file(pa.PythonFile(sink, mode="w"), schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
    write_atomic(path, write)


def cache_file_looks(path: Path, stamp: list) -> dict:
    """Cache one index file's looks (looks_cache_path: float16 as stored, in look_dtype records)
    and return its track templates (track_templates)."""
    looks = read_index_looks(path)
    records = np.empty(len(looks["track_id"]), look_dtype(looks["embedding"].shape[1]))
    for name in records.dtype.names:
        records[name] = looks[name]
    write_atomic(looks_cache_path(path, stamp), lambda sink: np.lib.format.write_array(sink, records))
    return track_templates(looks["track_id"], looks["embedding"])


def open_file_looks(path: Path, stamp: list) -> LooksFile:
    """Return where an index file's cached looks are (reading only the .npy header); raise
    IndexProblem when there are none for this stamp of the file (it changed since)."""
    cached = looks_cache_path(path, stamp)
    try:
        with open(cached, "rb") as file:
            version = np.lib.format.read_magic(file)
            header = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if header is None:
                raise ValueError(f".npy version {version}")
            shape, _, dtype = header(file)
            return LooksFile(cached, file.tell(), dtype, shape[0])
    except FileNotFoundError:
        raise IndexProblem(f"{path}: changed since its search cache was built; search again") from None
    except (OSError, ValueError) as error:
        raise IndexProblem(f"{cached}: cannot be read ({error}); search again to rebuild it") from None


def read_looks(looks: LooksFile, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Return the cached looks [start, start + count) of each range, one after the other, as
    records, reading only them (no memory map: a mapped page counts in the resident memory, and
    recent kernels map up to 2 MiB at a time)."""
    size = looks.dtype.itemsize
    chunks = []
    with open(looks.path, "rb") as file:
        for start, count in zip(starts.tolist(), counts.tolist()):
            file.seek(looks.offset + start * size)
            chunks.append(file.read(count * size))
    return np.frombuffer(b"".join(chunks), looks.dtype)


def cache_schema(dim: int, manifest: dict):
    """Return the Arrow schema of templates.arrow (manifest: its JSON metadata)."""
    import pyarrow as pa
    return pa.schema([("file_idx", pa.int32()), ("track_id", pa.int32()), ("look_start", pa.int64()),
                      ("look_count", pa.int32()), ("spread", pa.float32()), ("scale", pa.float32()),
                      ("code_l1", pa.int32()), ("codes", pa.list_(pa.uint8(), dim))],
                     metadata={CACHE_KEY: json.dumps(manifest).encode()})


def template_batches(parts: list, dim: int, schema) -> list:
    """Return templates.arrow's record batches (TEMPLATE_BLOCK_ROWS tracks each) from per-file
    templates [(file position, track_templates dict)]."""
    import pyarrow as pa
    names = ("track_id", "look_start", "look_count", "spread", "scale", "code_l1")
    joined = {name: np.concatenate([part[name] for _, part in parts] or [np.zeros(0)]) for name in names}
    joined["file_idx"] = np.concatenate([np.full(len(part["track_id"]), i, np.int32)
                                         for i, part in parts] or [np.zeros(0, np.int32)])
    codes = np.concatenate([part["codes"] for _, part in parts] or [np.zeros((0, dim), np.uint8)])
    batches = []
    for start in range(0, max(len(codes), 1), TEMPLATE_BLOCK_ROWS):
        rows = slice(start, start + TEMPLATE_BLOCK_ROWS)
        arrays = [pa.array(joined[f.name][rows], f.type) for f in schema if f.name != "codes"]
        flat = pa.array(codes[rows].reshape(-1), pa.uint8())
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, dim))
        batches.append(pa.RecordBatch.from_arrays(arrays, schema=schema))
    return batches


def read_cache_manifest(path: Path) -> dict | None:
    """Return templates.arrow's manifest, or None when there is none or it is unreadable."""
    import pyarrow as pa
    try:
        with pa.memory_map(str(path)) as source:
            manifest = json.loads(pa.ipc.open_file(source).schema.metadata[CACHE_KEY])
    except (OSError, pa.ArrowException, KeyError, TypeError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == CACHE_FORMAT else None


def cache_is_current(manifest: dict | None, paths: list) -> bool:
    """Return True when the cache lists exactly these index files with their current stamps, and
    each listed file's looks are cached."""
    if manifest is None:
        return False
    listed = {**manifest.get("skipped", {}), **{f["name"]: f for f in manifest.get("files", [])}}
    return sorted(listed) == sorted(p.name for p in paths) and \
        all(listed[p.name]["stamp"] == file_stamp(p) for p in paths) and \
        all(looks_cache_path(p, listed[p.name]["stamp"]).is_file() for p in paths
            if p.name not in manifest.get("skipped", {}))


def update_templates(index_dir: Path) -> dict:
    """Bring INDEX_DIR's search cache up to date with its index files (added, rewritten or
    removed), reusing what is cached for the unchanged ones; return {index file name: problem}
    for the files left out (damaged, foreign, another format: each names the file and the fix)."""
    index_dir = Path(index_dir)
    cache = index_dir / CACHE_DIR_NAME / TEMPLATE_CACHE_NAME
    paths = list_index_files(index_dir)
    manifest = read_cache_manifest(cache)
    if cache_is_current(manifest, paths):
        return {name: entry["problem"] for name, entry in manifest.get("skipped", {}).items()}
    old = load_cache(cache, index_dir) if manifest is not None else None
    reusable = {f["name"]: (i, f["stamp"]) for i, f in enumerate(manifest["files"])} if manifest else {}
    parts, files, skipped = [], [], {}
    with ThreadPoolExecutor(FILTER_THREADS) as pool:  # pyarrow and NumPy let go of the GIL
        for path, stamp, part in pool.map(lambda p: file_part(p, old, reusable), paths):
            if isinstance(part, str):
                skipped[path.name] = {"stamp": stamp, "problem": part}
                continue
            parts.append((len(files), part))
            files.append({"name": path.name, "stamp": stamp})
    dim = next((part["codes"].shape[1] for _, part in parts if part["codes"].size), 512)
    manifest = {"format": CACHE_FORMAT, "dim": dim, "files": files, "skipped": skipped}
    schema = cache_schema(dim, manifest)
    write_arrow_atomic(cache, schema, template_batches(parts, dim, schema))
    remove_stale_looks(index_dir, {looks_cache_path(index_dir / f["name"], f["stamp"]).name
                                   for f in files})
    return {name: entry["problem"] for name, entry in skipped.items()}


def file_part(path: Path, old: Templates | None, reusable: dict) -> tuple:
    """Return (path, stamp, its track templates or why it is left out), from the open cache when
    the file is unchanged and its looks are cached, else caching it (cache_file_looks)."""
    stamp, (position, old_stamp) = file_stamp(path), reusable.get(path.name, (None, None))
    try:
        if old_stamp == stamp and looks_cache_path(path, stamp).is_file():
            return path, stamp, cached_part(old, position)
        return path, stamp, cache_file_looks(path, stamp)
    except IndexProblem as error:
        return path, stamp, str(error)


def remove_stale_looks(index_dir: Path, kept: set) -> None:
    """Remove cached looks of index files gone, left out or changed (only this cache's files)."""
    for path in (Path(index_dir) / CACHE_DIR_NAME).glob(f"*{LOOKS_CACHE_SUFFIX}"):
        if path.name not in kept:
            path.unlink(missing_ok=True)


def cached_part(templates: Templates, file_position: int) -> dict:
    """Return one file's templates as they are in an open cache (a copy; its rows are contiguous)."""
    start, stop = np.searchsorted(templates.file_idx, [file_position, file_position + 1])
    return {"track_id": templates.track_id[start:stop].copy(),
            "look_start": templates.look_start[start:stop].copy(),
            "look_count": templates.look_count[start:stop].copy(),
            "spread": templates.spread[start:stop].copy(), "scale": templates.scale[start:stop].copy(),
            "code_l1": templates.code_l1[start:stop].copy(),
            "codes": template_codes(templates, start, stop)}


def template_codes(templates: Templates, start: int, stop: int) -> np.ndarray:
    """Return the uint8 template codes of cache rows [start, stop) (a copy)."""
    dim = templates.blocks[0].shape[1] if templates.blocks else 512
    pieces = [templates.blocks[b][max(start - b * TEMPLATE_BLOCK_ROWS, 0):stop - b * TEMPLATE_BLOCK_ROWS]
              for b in range(start // TEMPLATE_BLOCK_ROWS, -(-stop // TEMPLATE_BLOCK_ROWS))]
    return np.concatenate(pieces) if pieces else np.zeros((0, dim), np.uint8)


def list_values(column) -> np.ndarray:
    """Return a fixed-size list column as a [rows, size] NumPy view of its memory, touching none
    of it (Arrow's flatten() reads every value to skip nulls; these columns have none)."""
    size = column.type.list_size
    values = column.values.slice(column.offset * size, len(column) * size)
    return values.to_numpy(zero_copy_only=True).reshape(len(column), size)


def load_cache(path: Path, index_dir: Path) -> Templates:
    """Return templates.arrow, memory-mapped (its codes are read from the disk when used)."""
    import pyarrow as pa
    reader = pa.ipc.open_file(pa.memory_map(str(path)))
    manifest = json.loads(reader.schema.metadata[CACHE_KEY])
    batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]

    def column(name, kind):
        return np.concatenate([b.column(name).to_numpy() for b in batches]).astype(kind, copy=False)
    blocks = [list_values(b.column("codes")) for b in batches]
    return Templates([index_dir / f["name"] for f in manifest["files"]],
                     [f["stamp"] for f in manifest["files"]], column("file_idx", np.int32),
                     column("track_id", np.int32), column("look_start", np.int64),
                     column("look_count", np.int32), column("spread", np.float32),
                     column("scale", np.float32), column("code_l1", np.int32),
                     [b for b in blocks if len(b)],
                     {name: e["problem"] for name, e in manifest.get("skipped", {}).items()})


def open_templates(index_dir: Path, warm: bool = True) -> Templates:
    """Return INDEX_DIR's track templates, updating the search cache first (update_templates),
    with where every file's cached looks are (their headers read); warm: read every page of the
    templates once, so the first search does not wait for the disk. This is "opening the index"."""
    update_templates(index_dir)
    templates = load_cache(Path(index_dir) / CACHE_DIR_NAME / TEMPLATE_CACHE_NAME, Path(index_dir))
    for position, (path, stamp) in enumerate(zip(templates.files, templates.stamps)):
        templates.looks[position] = open_file_looks(path, stamp)
    if warm:
        for block in templates.blocks:
            np.bitwise_or.reduce(block.reshape(-1)[::4096])  # one byte per 4 KiB page
    return templates


def candidate_rows(templates: Templates, ref_embeddings: np.ndarray, threshold: float) -> np.ndarray:
    """Return the cache rows of the tracks that may have a look within threshold (cosine
    distance) of some photo: template similarity + slack >= 1 - threshold, a block of templates
    at a time (integer_product_session).

    Both sides are 8-bit: template = st (t - 128), photo = sr (r - 128), each value within half
    a step, so |photo . template - st sr (t-128).(r-128)| <= st sr (|t-128|_1 / 2 + |r-128|_1 / 2
    + dim / 4): the rounding slack is proven, the spread slack (SLACK_PER_SPREAD) measured.
    """
    photos, photo_scale, photo_l1 = quantise_photos(ref_embeddings)
    session = integer_product_session(FILTER_THREADS)
    # Per photo in the graph: (product + |r-128|_1/2 + dim/4) x sr, the best photo per track;
    # per track here the rest, with the largest sr (a bound at least as loose):
    # best >= (needed - spread slack) / st - |t-128|_1/2 x max sr
    feeds = {"photos": photos, "photo_add": (photo_l1 / 2 + photos.shape[0] / 4).astype(np.float32),
             "photo_scale": photo_scale.astype(np.float32)}
    needed = 1.0 - threshold - ROUNDING_SLACK
    found, first = [], 0
    for block in templates.blocks:
        rows = slice(first, first + len(block))
        best = session.run(["best"], {"codes": block, **feeds})[0]
        need = (needed - SLACK_PER_SPREAD * templates.spread[rows]) / templates.scale[rows] \
            - templates.code_l1[rows] / 2 * photo_scale.max()
        found.append(first + np.flatnonzero(best >= need))
        first += len(block)
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def exact_looks(templates: Templates, rows: np.ndarray, ref_embeddings: np.ndarray,
                ref_owners: np.ndarray, person_count: int, threshold: float) -> list:
    """Return a TrackLooks for each candidate row with a look within threshold of a person: the
    candidates' cached looks are read file by file (candidate_looks) and matched in one product;
    the distances of the tracks that pass are then naming.person_distances' own."""
    if len(rows) == 0:
        return []
    rows = rows[np.argsort(templates.file_idx[rows], kind="stable")]
    counts = templates.look_count[rows].astype(np.int64)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    bounds = np.flatnonzero(np.r_[True, np.diff(templates.file_idx[rows]) != 0, True])
    looks = np.concatenate([candidate_looks(templates, rows[a:b])
                            for a, b in zip(bounds[:-1], bounds[1:])])
    embeddings = looks["embedding"].astype(np.float32)
    best = (embeddings @ np.asarray(ref_embeddings, np.float32).T).max(axis=1)
    close = np.flatnonzero(np.maximum.reduceat(best, starts) >= 1.0 - threshold - ROUNDING_SLACK)
    found = []
    for i in close:
        part = slice(starts[i], starts[i] + counts[i])
        distances = person_distances(embeddings[part], ref_embeddings, ref_owners, person_count)
        if distances.min() <= threshold:
            found.append(TrackLooks(templates.files[templates.file_idx[rows[i]]],
                                    int(templates.track_id[rows[i]]), looks["frame_idx"][part],
                                    looks["time_s"][part], embeddings[part], distances))
    return sorted(found, key=lambda t: (str(t.index_file), t.track_id))


def candidate_looks(templates: Templates, rows: np.ndarray) -> np.ndarray:
    """Return the cached looks (records) of candidate rows of one index file, track after track;
    raise IndexProblem naming the file when it changed since the templates were opened."""
    file_position = int(templates.file_idx[rows[0]])
    path = templates.files[file_position]
    source = templates.looks.get(file_position) or open_file_looks(path, templates.stamps[file_position])
    counts = templates.look_count[rows]
    try:
        looks = read_looks(source, templates.look_start[rows], counts)
    except FileNotFoundError:  # the cache was rebuilt for a new version of the index file
        looks = None
    expected = np.repeat(templates.track_id[rows], counts)
    if looks is None or not np.array_equal(looks["track_id"], expected):
        raise IndexProblem(f"{path}: changed since its search cache was built; search again")
    return looks


def search_templates(templates: Templates, ref_embeddings: np.ndarray, ref_owners: np.ndarray,
                     person_count: int, threshold: float) -> list:
    """Return the TrackLooks of every track with a look within threshold (cosine distance) of a
    person, in cache order (by index file, then track)."""
    rows = candidate_rows(templates, ref_embeddings, threshold)
    return exact_looks(templates, rows, ref_embeddings, ref_owners, person_count, threshold)


def video_track_looks(index, index_file: Path, ref_embeddings: np.ndarray, ref_owners: np.ndarray,
                      person_count: int, threshold: float, every_track: bool = False) -> list:
    """Return the TrackLooks of one video's index (index.VideoIndex) that search_templates
    would return (every track with a look within threshold of a person; every track at all with
    every_track), by matching all its looks exactly: for a video just indexed, whose looks are
    in memory."""
    looks = index.looks
    if len(looks["track_id"]) == 0:
        return []
    embeddings = np.asarray(looks["embedding"], np.float32)
    bounds = np.flatnonzero(np.r_[True, np.diff(looks["track_id"]) != 0, True])
    found = []
    for a, b in zip(bounds[:-1], bounds[1:]):  # per track, as exact_looks does: the same sums
        distances = person_distances(embeddings[a:b], ref_embeddings, ref_owners, person_count)
        if every_track or distances.min() <= threshold:
            found.append(TrackLooks(Path(index_file), int(looks["track_id"][a]), looks["frame_idx"][a:b],
                                    looks["time_s"][a:b], embeddings[a:b], distances))
    return found


def cached_stamps(index_dir: Path) -> dict:
    """Return {index file name: [size, mtime_ns]} of the files whose looks the search cache
    holds: read whole (every page checked) when it was built, so unchanged since."""
    manifest = read_cache_manifest(Path(index_dir) / CACHE_DIR_NAME / TEMPLATE_CACHE_NAME)
    return {f["name"]: f["stamp"] for f in (manifest or {}).get("files", [])}
