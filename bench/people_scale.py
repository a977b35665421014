"""Benchmark: group the unnamed tracks of a big archive's index into people (issue #14).

    python bench/people_scale.py --hours 100    # reuses bench/search_scale.py's synthetic index

On the synthetic index of bench/search_scale.py (one Parquet file per hour: 2,000 tracks of random
faces, 1 to 15 looks each with the look-to-look similarity of real tracks, face sizes 32-200 px,
and 20 planted tracks of each of 10 people in the first 50 hours), built first if missing, a
fresh process runs findpeople.people.unnamed_people with main.py's defaults and no track named:
every track of at least UNNAMED_MIN_LOOKS looks and UNNAMED_MIN_FACE_SIZE px is grouped. The
last line is
    people_s=<seconds> tracks_kept=<n> groups=<g> planted_groups=<p> peak_rss_mib=<MiB>
where planted_groups counts the groups that hold planted tracks (10 if each person's 20 tracks
were grouped together; more if some stayed apart), and the line above it splits the time into
reading the looks and grouping.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def fake_info(idx: int, path: Path):
    """Return a VideoInfo for a synthetic hour (25 fps, one hour long)."""
    from findpeople.decode import VideoInfo
    return VideoInfo(idx=idx, path=str(path), output_name=path.stem, width=1920, height=1080,
                     fps=25.0, frame_count=90000, duration_s=3600.0, time_base=Fraction(1, 25),
                     origin_pts=0, video_start_offset_s=0.0, has_audio=False)


def group_child(folder: Path) -> None:
    """In a fresh process: time reading and grouping the unnamed tracks; print the result line."""
    import main
    import search_scale
    from findpeople.people import group_tracks, video_tracks
    settings = main.load_settings([])
    files = sorted(folder.glob("*.parquet"))
    started = time.perf_counter()
    tracks = [t for v, path in enumerate(files) for t in video_tracks(path, v, set(), settings)]
    read_s = time.perf_counter() - started
    groups = group_tracks(tracks, settings.UNNAMED_MIN_TRACKS)
    total_s = time.perf_counter() - started
    truth = json.loads((folder / "truth.json").read_text())
    planted = {(name, track) for name, track, _ in truth["planted"]}
    names = [p.stem for p in files]
    with_planted = [g for g in groups
                    if any((names[t.video] + ".parquet", t.track_id) in planted for t in g.tracks)]
    print(f"read_s={read_s:.2f} group_s={total_s - read_s:.2f} largest_group={max(len(g.tracks) for g in groups)}")
    print(f"people_s={total_s:.2f} tracks_kept={len(tracks)} groups={len(groups)} "
          f"planted_groups={len(with_planted)} peak_rss_mib={search_scale.peak_rss_mib():.0f}")


def main_bench() -> int:
    """Build (or reuse) the synthetic index, then group it in a fresh process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=int, default=100)
    parser.add_argument("--group-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.group_child:
        group_child(args.group_child)
        return 0
    import search_scale
    folder = search_scale.WORK / f"hours_{args.hours}" / f"threshold_{search_scale.THRESHOLD:.2f}"
    if not (folder / "truth.json").is_file():
        print(f"[people_scale] building {args.hours} hours in {folder} (search_scale.build) ...", flush=True)
        search_scale.build(args.hours, folder)
    return subprocess.call([sys.executable, __file__, "--group-child", str(folder)])


if __name__ == "__main__":
    sys.exit(main_bench())
