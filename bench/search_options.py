"""Compare ways to search an archive's stored looks for 10 people (issue #12, part 5).

    python bench/search_scale.py --hours 100      # first: builds the synthetic index
    python bench/search_options.py --hours 100    # about 5 minutes on a 2-core CPU machine

On the synthetic index that bench/search_scale.py built (same data, same photos, same threshold),
each option runs REPEATS times, each time in a fresh process (its peak RSS is its own), after its
data is memory-mapped and read once (the "opened" state, not timed), with one discarded warm-up:
  brute_f16 / brute_i8   every look, float16 / int8 (per-row scale), memory-mapped, NumPy in blocks
  tmpl_f32 / tmpl_f16 / tmpl_i8   one template per track (findpeople.search), NumPy in blocks
  tmpl_u8_ort            the same 8-bit templates multiplied by ONNX Runtime's MatMulInteger:
                         what search.candidate_rows does (the production filter, bounds included)
  faiss_sq8              faiss IndexScalarQuantizer (8 bit) over the templates, range_search
  usearch_i8             usearch exact (brute-force) search over the int8 templates, top 1,000
Prints per option the median and spread (min-max) of the search time in s, the peak RSS in MiB,
and the candidates found; faiss-cpu and usearch are measurement-only (not in the requirements).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# ──────────────────────────────────────────────────────────────────────────────────────────────
# SETTINGS
# ──────────────────────────────────────────────────────────────────────────────────────────────
REPO = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/findpeople_search_scale")  # where bench/search_scale.py keeps its indexes
OPTIONS = ("brute_f16", "brute_i8", "tmpl_f32", "tmpl_f16", "tmpl_i8", "tmpl_u8_ort", "faiss_sq8",
           "usearch_i8")
REPEATS = 3
BLOCK_ROWS = 65536  # rows per numpy step
THRESHOLD = 0.60  # as bench/search_scale.py
SLACK = 0.35 * 0.6  # search.SLACK_PER_SPREAD x a typical spread: one radius for the whole filter
# ──────────────────────────────────────────────────────────────────────────────────────────────

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from search_scale import peak_rss_mib  # noqa: E402
from findpeople.index import iter_looks  # noqa: E402
from findpeople.search import candidate_rows, list_index_files, open_templates  # noqa: E402


def prepare(folder: Path) -> Path:
    """Write the options' arrays (all looks float16 and int8, templates float32 and float16) as
    .npy files under folder/options (once); return that folder."""
    out = folder / "options"
    if (out / "done").exists():
        return out
    out.mkdir(exist_ok=True)
    paths = list_index_files(folder)
    count = sum(len(looks["track_id"]) for _, _, looks in iter_looks(paths, ("track_id",)))
    f16 = np.lib.format.open_memmap(out / "looks_f16.npy", "w+", np.float16, (count, 512))
    i8 = np.lib.format.open_memmap(out / "looks_i8.npy", "w+", np.int8, (count, 512))
    scale = np.zeros(count, np.float32)
    row = 0
    for _, _, looks in iter_looks(paths, ("embedding",)):
        block = looks["embedding"]
        f16[row:row + len(block)] = block
        scale[row:row + len(block)] = np.abs(block).max(axis=1) / 127
        i8[row:row + len(block)] = np.rint(block / scale[row:row + len(block), None])
        row += len(block)
    f16.flush(), i8.flush()
    np.save(out / "looks_i8_scale.npy", scale)
    templates = open_templates(folder)
    codes = (np.concatenate(templates.blocks).astype(np.int16) - 128).astype(np.int8)
    np.save(out / "tmpl_i8.npy", codes)
    np.save(out / "tmpl_i8_scale.npy", templates.scale)
    np.save(out / "tmpl_f32.npy", codes.astype(np.float32) * templates.scale[:, None])
    np.save(out / "tmpl_f16.npy", (codes.astype(np.float32) * templates.scale[:, None]).astype(np.float16))
    (out / "done").write_text("")
    return out


def opened(path: Path) -> np.ndarray:
    """Return a memory-mapped .npy with every page read once."""
    array = np.load(path, mmap_mode="r")
    np.bitwise_or.reduce(array.reshape(-1).view(np.uint8)[::4096])
    return array


def numpy_scan(matrix: np.ndarray, scale, photos: np.ndarray, needed: float) -> int:
    """Return how many rows have a similarity >= needed to a photo (block by block)."""
    hits = 0
    for start in range(0, len(matrix), BLOCK_ROWS):
        sims = matrix[start:start + BLOCK_ROWS].astype(np.float32) @ photos.T
        if scale is not None:
            sims *= scale[start:start + BLOCK_ROWS, None]
        hits += int(np.count_nonzero((sims >= needed).any(axis=1)))
    return hits


def option_runner(option: str, out: Path, photos: np.ndarray):
    """Return a function running one search of this option (its data opened first)."""
    if option == "tmpl_u8_ort":
        templates = open_templates(out.parent)
        return lambda: len(candidate_rows(templates, photos, THRESHOLD))
    needed = 1 - THRESHOLD - SLACK if option.startswith(("tmpl", "faiss", "usearch")) else 1 - THRESHOLD
    if option.startswith(("brute", "tmpl")):
        kind = {"brute_f16": "looks_f16", "brute_i8": "looks_i8"}.get(option, option)
        matrix = opened(out / f"{kind}.npy")
        scale = np.load(out / f"{kind}_scale.npy") if option.endswith("i8") else None
        return lambda: numpy_scan(matrix, scale, photos, needed)
    codes = opened(out / "tmpl_i8.npy")
    if option == "faiss_sq8":
        import faiss
        index = faiss.IndexScalarQuantizer(512, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        data = np.load(out / "tmpl_f32.npy", mmap_mode="r")
        index.train(np.ascontiguousarray(data[:100_000]))
        for start in range(0, len(data), 262144):
            index.add(np.ascontiguousarray(data[start:start + 262144]))
        return lambda: len(np.unique(index.range_search(photos, needed)[2]))
    from usearch.index import MetricKind, search as exact_search
    queries = np.rint(photos / (np.abs(photos).max(axis=1, keepdims=True) / 127)).astype(np.int8)
    return lambda: int(np.sum(exact_search(codes, queries, 1000, MetricKind.IP, exact=True).distances < 1e9))


def run_option(option: str, folder: Path) -> dict:
    """Open one option's data, search REPEATS times after a warm-up; return times and RSS."""
    truth = json.loads((folder / "truth.json").read_text())
    photos = np.array(truth["photos"], np.float32)
    started = time.perf_counter()
    runner = option_runner(option, folder / "options", photos)
    open_s = time.perf_counter() - started
    candidates = runner()
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        runner()
        times.append(time.perf_counter() - started)
    return {"option": option, "open_s": open_s, "search_s": times, "candidates": candidates,
            "peak_rss_mib": peak_rss_mib()}


def versions() -> str:
    """Return the library versions that were found."""
    found = [f"numpy {np.__version__}"]
    for name in ("faiss", "usearch"):
        try:
            found.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def main() -> int:
    """Prepare the data, run each option in a fresh process, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=int, default=100)
    parser.add_argument("--options", nargs="*", default=list(OPTIONS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = WORK / f"hours_{args.hours}" / f"threshold_{THRESHOLD:.2f}"
    if args.child:
        print(json.dumps(run_option(args.child, folder)))
        return 0
    prepare(folder)
    print(f"[options] {args.hours} h, {versions()}")
    for option in args.options:
        child = subprocess.run([sys.executable, __file__, "--hours", str(args.hours), "--child", option],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(f"{option:11s} failed: {child.stderr.strip().splitlines()[-1:]}")
            continue
        result = json.loads(child.stdout.splitlines()[-1])
        times = result["search_s"]
        print(f"{option:11s} search_s median {np.median(times):.3f} (spread {min(times):.3f}-{max(times):.3f}) "
              f"open_s {result['open_s']:.1f} peak_rss_mib {result['peak_rss_mib']:.0f} "
              f"candidates {result['candidates']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
