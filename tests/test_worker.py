"""Worker (findpeople/worker.py): batches of ring slots through detection, the sequencer and the
tracker."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import TESTDATA
from findpeople.decode import decode_frames, probe_video
from findpeople.index import faces_with_boxes, records_table, table_index
from findpeople.naming import name_video
from findpeople.references import Reference, embed_reference_photo, reference_matrix
from findpeople.search import video_track_looks
from findpeople.settings import Settings
from findpeople.worker import WorkerContext, process_batch


def named_people(messages: list, references: list, settings: Settings) -> list:
    """Return the names of the track pieces a search for the references finds in a video's
    ("track", video_idx, record) messages: index table, read back, matched, named."""
    index = table_index(records_table([m[2] for m in messages if m[0] == "track"], {"counts": {}}))
    photos, owners = reference_matrix(references)
    looks = video_track_looks(index, Path("video.parquet"), photos, owners, len(references),
                              settings.CUSTOM_THRESHOLD)
    summaries = name_video(faces_with_boxes(index.faces), looks, [r.name for r in references], settings)
    return [summary["name"] for summary in summaries]


def test_a_finished_video_lets_go_of_its_frames_on_the_device(main_module, device_models, tmp_path):
    """After a video's end marker, its sequencer and tracker are dropped and no frame batch of it
    stays uploaded (a folder of many videos must not pile up device memory)."""
    import gc
    import queue as queues
    import weakref
    settings, models = device_models
    values = dict(settings.values, OUTPUT_DIR=str(tmp_path / "out"), CUSTOM_THRESHOLD=0.7)
    settings = Settings(tuple(values.items()))
    path = TESTDATA / "videos" / "obama_whcd.mp4"
    info = probe_video(path, 0, "obama_whcd")
    frames = [image for _, _, image in decode_frames(info, 6)][:8]
    ring = np.zeros((len(frames), info.height, info.width, 3), np.uint8)
    embedding, _ = embed_reference_photo(TESTDATA / "refs" / "Barack_Obama.jpg", models, settings)
    reference = Reference("Barack_Obama", ["x"], embedding[None])
    results, free = queues.Queue(), queues.Queue()
    context = WorkerContext(settings, ring, [info], models, free, results)
    items = []
    for seq, image in enumerate(frames):
        ring[seq] = image
        items.append((0, seq, seq * 6, seq * 0.4, info.height, info.width, seq))
    uploaded = []
    real_upload = models.device.upload
    models.device.upload = lambda images: uploaded.append(real_upload(images)) or uploaded[-1]
    try:
        process_batch(context, items[:4])
        process_batch(context, [*items[4:], (0, len(frames), None, None, 0, 0, None)])
    finally:
        models.device.upload = real_upload
    assert len(uploaded) == 2, f"{len(uploaded)} uploads for 2 batches"
    refs = [weakref.ref(frames_on_device) for frames_on_device in uploaded]
    uploaded.clear()
    gc.collect()
    assert context.sequencers == {}, "the finished video's sequencer is still kept"
    assert all(r() is None for r in refs), "an uploaded batch of a finished video is still referenced"
    kinds = [m[0] for m in list(results.queue)]
    assert kinds.count("progress") == len(frames) and "video_tracked" in kinds, kinds
    named = named_people(list(results.queue), [reference], settings)
    assert "Barack_Obama" in named, f"named {named}; messages {kinds}"
    assert free.qsize() == len(frames), "every ring slot was returned"
