"""Index: one Parquet file per video with its faces, tracks and looks (embeddings), and its I/O.

Runs in the process that indexes a video (write_index) and in the parent at search time (read
the looks, check an index before reusing it). In: per processed frame, each face's track, box and
score, and for the faces that were recognised ("looks") their landmarks, size and embedding, plus
the metadata that says what the index was made from. Out: INDEX_DIR/<video folder>.parquet, a
plain Parquet file that any tool reads (schema in docs/index.md). Nothing here knows the reference
photos: they are only needed at search time (search.py).

Ownership: a file is written through a temporary file with a unique name in the same folder and
renamed into place, so a killed writer leaves the previous index (or none) and two writers of the
same file end with one whole file (the last rename wins). Readers never lock.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInput
from .settings import Settings
from .outputs import fsync_file
from .providers import file_sha256


INDEX_FORMAT = 1  # bump when the columns or the metadata change meaning
METADATA_KEY = b"findpeople.index"  # the file's key-value metadata: one JSON document
INDEX_SUFFIX = ".parquet"
# The settings that change what is indexed (which faces, tracks and looks, and their embeddings).
# The matching settings (CUSTOM_THRESHOLD, MATCH_MARGIN, MIN_TRACK_HITS) and the clip settings
# only apply at search time. PROVIDERS is replaced by what it resolves to (the execution
# fingerprint: providers that load, GPU models), as two spellings of the same chain index alike.
INDEX_SETTINGS = ("DET_SIZE", "PRE_UPSCALE_FACTOR", "det_prob_threshold", "MIN_FACE_SIZE",
                  "RECOGNITION_INTERVAL", "TRACK_MAX_GAP", "FRAME_INTERVAL", "FRAMES_ON_DEVICE",
                  "TRT_FP16")
FACE_COLUMNS = ("track_id", "frame_idx", "time_s", "x1", "y1", "x2", "y2", "score")
LOOK_COLUMNS = ("kps", "face_size_px", "embedding")
# Looks come first, in row groups of their own: reading a track's looks reads ~1 MiB (float16),
# not a whole file, and a reader of the looks never materialises the other faces' empty embeddings.
LOOK_ROW_GROUP_ROWS = 1024
FACE_ROW_GROUP_ROWS = 65536
ABANDONED_PART_AGE_S = 3600.0  # a temporary file this old is a killed writer's (writes take seconds)


@dataclass
class VideoIndex:
    """One video's index as NumPy arrays: every face, the looks (the first look_count faces)."""

    faces: dict  # FACE_COLUMNS -> [faces] arrays, looks first (see index_table)
    looks: dict  # track_id, frame_idx, time_s, kps [looks, 10], face_size_px, embedding [looks, dim]
    metadata: dict


class IndexProblem(BadInput):
    """An index file that cannot be used: the message names the file and says why."""


def index_path(index_dir: Path, output_name: str) -> Path:
    """Return where a video's index goes: INDEX_DIR/<video folder name>.parquet."""
    return Path(index_dir) / f"{output_name}{INDEX_SUFFIX}"


def model_sha256(model_paths: list) -> dict:
    """Return {model file name: hex SHA-256 of its bytes} (what the embeddings depend on)."""
    return {Path(p).name: file_sha256(Path(p)) for p in model_paths}


def index_identity(video: dict, models: dict, settings: Settings, execution: dict) -> dict:
    """Return what an index must match to be reused: the format, the video's content fingerprint
    (resume.video_fingerprint), the model files' SHA-256 (model_sha256), the INDEX_SETTINGS and
    what runs the models (resume.execution_fingerprint), as JSON reads them back."""
    return json.loads(json.dumps({
        "format": INDEX_FORMAT, "video": video, "models": models,
        "settings": {name: settings.values[name] for name in INDEX_SETTINGS},
        "execution": execution}))


def index_metadata(identity: dict, info) -> dict:
    """Return the metadata written with an index: its identity, the video facts the search needs
    later (name, output folder, duration in s, fps, size in px), when it was written, and a
    unique id per write."""
    facts = {"name": Path(info.path).name, "output_name": info.output_name,
             "duration_s": float(info.duration_s), "fps": float(info.fps),
             "width": int(info.width), "height": int(info.height)}
    return {**identity, "video_facts": facts, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "write_id": uuid.uuid4().hex}


def index_schema(dim: int, metadata: dict | None = None):
    """Return the Arrow schema of an index with embeddings of `dim` float16 values."""
    import pyarrow as pa
    fields = [pa.field("track_id", pa.int32(), False), pa.field("frame_idx", pa.int64(), False),
              pa.field("time_s", pa.float64(), False),
              *(pa.field(name, pa.float32(), False) for name in ("x1", "y1", "x2", "y2", "score")),
              pa.field("kps", pa.list_(pa.float32(), 10)), pa.field("face_size_px", pa.float32()),
              pa.field("embedding", pa.list_(pa.float16(), dim))]
    encoded = {METADATA_KEY: json.dumps(metadata).encode()} if metadata is not None else None
    return pa.schema(fields, metadata=encoded)


def face_keys(track_id: np.ndarray, frame_idx: np.ndarray) -> np.ndarray:
    """Return one int64 per (track, frame), ordered as (track_id, frame_idx) are."""
    return np.asarray(track_id, np.int64) * (1 << 32) + np.asarray(frame_idx, np.int64)


def look_rows(faces: dict, looks: dict) -> np.ndarray:
    """Return, per look, the row of faces with its (track_id, frame_idx); raise ValueError when a
    look has no face or two looks share one."""
    keys = face_keys(faces["track_id"], faces["frame_idx"])
    order = np.argsort(keys, kind="stable")
    wanted = face_keys(looks["track_id"], looks["frame_idx"])
    at = np.minimum(np.searchsorted(keys[order], wanted), len(keys) - 1) if len(keys) else wanted * 0
    if len(wanted) and (len(keys) == 0 or np.any(keys[order][at] != wanted)):
        raise ValueError("a look has no face row with the same track_id and frame_idx")
    rows = order[at] if len(wanted) else np.zeros(0, np.int64)
    if len(np.unique(rows)) != len(rows):
        raise ValueError("two looks share one face row (track_id, frame_idx)")
    return rows


def ordered_rows(faces: dict, looks: dict) -> tuple:
    """Return (face rows in file order, look order): the looks' faces by (track, frame), then
    the other faces by (track, frame)."""
    rows = look_rows(faces, looks)
    keys = face_keys(faces["track_id"], faces["frame_idx"])
    look_order = np.argsort(keys[rows], kind="stable")
    others = np.setdiff1d(np.arange(len(keys)), rows)
    others = others[np.argsort(keys[others], kind="stable")]
    return np.concatenate([rows[look_order], others]).astype(np.int64), look_order


def index_table(faces: dict, looks: dict, metadata: dict):
    """Return one video's index as an Arrow table in file order (see ordered_rows).

    faces: track_id, frame_idx, time_s, box [faces, 4] (x1, y1, x2, y2 in px), score, one entry
    per face in a processed frame. looks: track_id, frame_idx (the face it was made of), kps
    [looks, 5, 2] in px, face_size_px, embedding [looks, dim] (L2-normalised).
    """
    import pyarrow as pa
    order, look_order = ordered_rows(faces, looks)
    embedding = np.asarray(looks["embedding"], np.float32)[look_order]
    dim = embedding.shape[1] if embedding.ndim == 2 and embedding.shape[1] else 512
    box = np.asarray(faces["box"], np.float32).reshape(-1, 4)[order]
    columns = {"track_id": np.asarray(faces["track_id"], np.int32)[order],
               "frame_idx": np.asarray(faces["frame_idx"], np.int64)[order],
               "time_s": np.asarray(faces["time_s"], np.float64)[order],
               **{name: box[:, i] for i, name in enumerate(("x1", "y1", "x2", "y2"))},
               "score": np.asarray(faces["score"], np.float32)[order]}
    look_values = {"kps": np.asarray(looks["kps"], np.float32).reshape(-1, 10)[look_order],
                   "face_size_px": np.asarray(looks["face_size_px"], np.float32)[look_order],
                   "embedding": embedding.astype(np.float16)}
    schema = index_schema(dim, {**metadata, "look_count": len(look_order), "face_count": len(order),
                                "embedding_dim": dim})
    arrays = [pa.chunked_array([pa.array(columns[f.name], f.type)]) if f.name in columns
              else look_column(look_values[f.name], len(order) - len(look_order), f.type)
              for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def look_column(values: np.ndarray, other_rows: int, kind):
    """Return a look column: the looks' values, then a null for each other face (in chunks that
    share one block of nulls, so the other faces cost no memory here)."""
    import pyarrow as pa
    if pa.types.is_fixed_size_list(kind):
        first = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), kind.value_type),
                                                  kind.list_size)
    else:
        first = pa.array(values, kind)
    full, rest = divmod(other_rows, FACE_ROW_GROUP_ROWS)
    block = pa.nulls(min(other_rows, FACE_ROW_GROUP_ROWS), kind)
    return pa.chunked_array([first] + [block] * full + ([block.slice(0, rest)] if rest else []), kind)


def write_index(path: Path, table) -> None:
    """Write an index table (index_table) to path atomically: a uniquely named temporary file in
    the same folder, flushed to the disk, then renamed over path. Any failure (disk full, Ctrl-C,
    a killed process) leaves the previous file, or none; an OSError names the file."""
    import pyarrow.parquet as pq
    path = Path(path)
    part = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.part")
    look_count = json.loads(table.schema.metadata[METADATA_KEY])["look_count"]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(part, table.schema, compression="zstd", write_page_checksum=True,
                              use_byte_stream_split=["embedding", "kps"]) as writer:
            writer.write_table(table.slice(0, look_count), row_group_size=LOOK_ROW_GROUP_ROWS)
            writer.write_table(table.slice(look_count), row_group_size=FACE_ROW_GROUP_ROWS)
        fsync_file(part)
        os.replace(part, path)
    except BaseException as error:
        part.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno,
                          f"cannot write the index {path}: {error.strerror or error}") from error
        raise


def remove_abandoned_parts(index_dir: Path, older_than_s: float = ABANDONED_PART_AGE_S) -> list:
    """Remove the temporary files of writers killed mid-write (older than older_than_s; a live
    writer's is seconds old) from the index folder; return their paths."""
    now_s = time.time()
    stale = [p for p in Path(index_dir).glob(f".*{INDEX_SUFFIX}.*.part")
             if p.is_file() and now_s - p.stat().st_mtime > older_than_s]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def open_index(path: Path):
    """Return (pyarrow ParquetFile, metadata) of an index; raise IndexProblem naming the file
    when it is missing, truncated, not Parquet, or not an index of this format."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = Path(path)
    if not path.is_file():
        raise IndexProblem(f"{path}: no index yet")
    try:
        parquet = pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as error:
        raise IndexProblem(f"{path}: {unreadable_reason(path)} ({error}); "
                           f"the video is indexed again") from None
    raw = (parquet.metadata.metadata or {}).get(METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw is not None else None
    except ValueError:
        metadata = None
    if not isinstance(metadata, dict) or not has_index_columns(parquet.schema_arrow):
        raise IndexProblem(f"{path}: a Parquet file this tool did not write (no findpeople index "
                           f"metadata or columns): a video of that name gets its index written over it; keep "
                           f"other files out of the index folder")
    if metadata.get("format") != INDEX_FORMAT:
        raise IndexProblem(f"{path}: made by another version of this tool (index format "
                           f"{metadata.get('format')}, this one reads {INDEX_FORMAT}); "
                           f"the video is indexed again")
    return parquet, metadata


def unreadable_reason(path: Path) -> str:
    """Return why pyarrow cannot open a file, in words: truncated or damaged, or not Parquet."""
    with open(path, "rb") as file:
        head = file.read(4)
    if head == b"PAR1":
        return "truncated or damaged (a run was killed while writing it, or the disk failed)"
    return "not a Parquet file"


def has_index_columns(schema) -> bool:
    """Return True when an Arrow schema has every column of an index."""
    return all(name in schema.names for name in (*FACE_COLUMNS, *LOOK_COLUMNS))


def identity_problem(metadata: dict, expected: dict) -> str | None:
    """Return what differs between an index's identity and the expected one (index_identity), in
    words, or None when it may be reused."""
    if metadata.get("video") != expected["video"]:
        return "its video file changed since it was indexed"
    if metadata.get("models") != expected["models"]:
        return (f"it was made with other model files ({', '.join(sorted(metadata.get('models') or {}))}"
                f"; now {', '.join(sorted(expected['models']))})")
    old = metadata.get("settings") if isinstance(metadata.get("settings"), dict) else {}
    changed = [name for name, value in expected["settings"].items() if old.get(name) != value]
    if changed:
        return "indexing settings changed: " + ", ".join(
            f"{name} {old.get(name)!r} -> {expected['settings'][name]!r}" for name in changed)
    if metadata.get("execution") != expected["execution"]:
        return f"it was made on {metadata.get('execution')}, this run uses {expected['execution']}"
    return None


def index_problem(path: Path, expected: dict, read_data: bool = True) -> str | None:
    """Return why the index at path cannot be reused for the expected identity (index_identity),
    naming the file, or None when it can (see checked_index)."""
    return checked_index(path, expected, read_data)[0]


def checked_index(path: Path, expected: dict, read_data: bool = True) -> tuple:
    """Return (why the index at path cannot be reused, naming the file, or None when it can; its
    metadata, or None when it cannot be read). Why: missing, truncated, not Parquet, a foreign
    file, another format, other models, the video changed, settings changed, or (read_data) a
    damaged page or a row count that disagrees with its metadata."""
    try:
        parquet, metadata = open_index(path)
    except IndexProblem as error:
        return str(error), None
    with closing(parquet):
        problem = identity_problem(metadata, expected)
        if problem is None and read_data:
            problem = data_problem(parquet, metadata)
    return (None if problem is None else f"{path}: {problem}; the video is indexed again"), metadata


def data_problem(parquet, metadata: dict) -> str | None:
    """Return why an index's rows disagree with its metadata or fail their page checksums (every
    column is read, a row group at a time), or None."""
    import pyarrow as pa
    if parquet.metadata.num_rows != metadata.get("face_count"):
        return (f"it holds {parquet.metadata.num_rows} faces, its metadata says "
                f"{metadata.get('face_count')}")
    looks = 0
    try:
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group)  # every page: its checksum is verified
            looks += table.num_rows - table.column("embedding").null_count
    except (pa.ArrowException, OSError) as error:
        return f"damaged ({error})"
    if looks != metadata.get("look_count"):
        return f"it holds {looks} looks, its metadata says {metadata.get('look_count')}"
    return None


def read_index(path: Path) -> VideoIndex:
    """Return a whole index as NumPy arrays (looks first); raise IndexProblem naming the file
    when it cannot be read."""
    import pyarrow as pa
    parquet, metadata = open_index(path)
    try:
        with closing(parquet):
            table = parquet.read(columns=list(FACE_COLUMNS))
            looks = read_look_rows(parquet, 0, metadata["look_count"])
    except (pa.ArrowException, OSError) as error:
        raise IndexProblem(f"{path}: damaged ({error}); the video is indexed again") from None
    faces = {name: table.column(name).to_numpy() for name in FACE_COLUMNS}
    return VideoIndex(faces, looks, metadata)


def look_row_groups(parquet, start: int, stop: int) -> list:
    """Return (row group, its first row) of the row groups holding rows [start, stop)."""
    found, first = [], 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if first < stop and first + rows > start:
            found.append((group, first))
        first += rows
        if first >= stop:
            break
    return found


def read_look_rows(parquet, start: int, stop: int,
                   columns: tuple = ("track_id", "frame_idx", "time_s", "kps", "face_size_px",
                                     "embedding")) -> dict:
    """Return the looks at rows [start, stop) of an index (looks come first) as NumPy arrays:
    kps [looks, 10], embedding [looks, dim] float32; reads only the row groups holding them."""
    groups = look_row_groups(parquet, start, stop)
    if not groups:
        return {name: empty_look_column(parquet, name) for name in columns}
    table = parquet.read_row_groups([g for g, _ in groups], columns=list(columns))
    table = table.slice(start - groups[0][1], stop - start)
    return {name: column_to_numpy(table.column(name)) for name in columns}


def column_to_numpy(column) -> np.ndarray:
    """Return an Arrow column as NumPy: a fixed-size list column as [rows, width] float32."""
    import pyarrow as pa
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        flat = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in column.chunks]
        values = np.concatenate(flat) if flat else np.zeros(0, np.float32)
        return values.astype(np.float32, copy=False).reshape(-1, width)
    return column.to_numpy()


def empty_look_column(parquet, name: str) -> np.ndarray:
    """Return an empty array shaped like a look column."""
    kind = parquet.schema_arrow.field(name).type
    import pyarrow as pa
    if pa.types.is_fixed_size_list(kind):
        return np.zeros((0, kind.list_size), np.float32)
    return np.zeros(0, kind.to_pandas_dtype())


def iter_looks(paths: list, columns: tuple = ("track_id", "embedding")):
    """Yield (path, metadata, look arrays) one look row group at a time for many index files,
    so memory holds one row group (~1 MiB of float16 embeddings), never a whole archive; raise
    IndexProblem naming a file that cannot be read."""
    import pyarrow as pa
    for path in paths:
        parquet, metadata = open_index(path)
        count = metadata["look_count"]
        try:
            with closing(parquet):
                for start in range(0, count, LOOK_ROW_GROUP_ROWS):
                    stop = min(start + LOOK_ROW_GROUP_ROWS, count)
                    yield path, metadata, read_look_rows(parquet, start, stop, columns)
        except (pa.ArrowException, OSError) as error:
            raise IndexProblem(f"{path}: damaged ({error}); the video is indexed again") from None


def records_table(records: list, metadata: dict):
    """Return the index table (index_table) of one video's track records (tracks.track_record)."""
    faces = np.concatenate([r["faces"] for r in records]) if records else np.zeros((0, 7))
    face_tracks = np.concatenate([np.full(len(r["faces"]), r["track"], np.int32) for r in records]) \
        if records else np.zeros(0, np.int32)
    looks = [r["looks"] for r in records]
    look_tracks = [np.full(len(look["frame_idx"]), r["track"], np.int32) for r, look in zip(records, looks)]
    dims = [look["embedding"].shape[1] for look in looks if len(look["frame_idx"])]
    dim = dims[0] if dims else 512

    def joined(name, shape):
        parts = [look[name].reshape(-1, *shape) for look in looks if len(look["frame_idx"])]
        return np.concatenate(parts) if parts else np.zeros((0, *shape))
    return index_table(
        {"track_id": face_tracks, "frame_idx": faces[:, 0].astype(np.int64), "time_s": faces[:, 1],
         "box": faces[:, 2:6], "score": faces[:, 6]},
        {"track_id": np.concatenate(look_tracks) if look_tracks else np.zeros(0, np.int32),
         "frame_idx": joined("frame_idx", ()).astype(np.int64), "kps": joined("kps", (10,)),
         "face_size_px": joined("face_size_px", ()), "embedding": joined("embedding", (dim,))},
        metadata)


def table_index(table) -> VideoIndex:
    """Return an index table (index_table) as NumPy arrays, as read_index returns a file: the
    same float16-rounded embeddings whether the index was just made or read back."""
    metadata = json.loads(table.schema.metadata[METADATA_KEY])
    count = metadata["look_count"]
    faces = {name: column_to_numpy(table.column(name)) for name in FACE_COLUMNS}
    looks = {name: column_to_numpy(table.column(name).slice(0, count))
             for name in ("track_id", "frame_idx", "time_s", *LOOK_COLUMNS)}
    return VideoIndex(faces, looks, metadata)


def faces_with_boxes(faces: dict) -> dict:
    """Return an index's faces (FACE_COLUMNS arrays) with the box as one [n, 4] array."""
    return {"track_id": faces["track_id"], "frame_idx": faces["frame_idx"],
            "time_s": faces["time_s"], "score": faces["score"],
            "box": np.stack([faces[name] for name in ("x1", "y1", "x2", "y2")], axis=1).reshape(-1, 4)}


def read_faces(path: Path) -> tuple:
    """Return (every face of an index as faces_with_boxes arrays, its metadata); raise
    IndexProblem naming the file when it cannot be read."""
    import pyarrow as pa
    parquet, metadata = open_index(path)
    try:
        with closing(parquet):
            table = parquet.read(columns=list(FACE_COLUMNS))
    except (pa.ArrowException, OSError) as error:
        raise IndexProblem(f"{path}: damaged ({error}); the video is indexed again") from None
    return faces_with_boxes({name: column_to_numpy(table.column(name)) for name in FACE_COLUMNS}), metadata
