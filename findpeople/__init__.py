"""findpeople: the engine behind main.py, one module per pipeline stage.

main.py holds the settings block and main(); it hands a frozen Settings record to this package,
which never reads main.py's constants. Importing any module here does no work and loads no heavy
library (onnxruntime, insightface, cv2, av, ray are imported inside the functions that need them),
because every `spawn` child re-imports the modules of its target.

The modules, in import order: each imports only modules above it (tests/test_layout.py checks).

    errors      the named exceptions the user sees (BadInput, ClipError, OutputError, PipelineBroken)
    settings    the Settings record, one flag per setting, validation
    outputs     snapshot names and pictures, person colours, atomic file writes
    ring        the shared-memory ring, its plan, and the child-process frame (run_child)
    folders     what the video and photo folders hold: links followed once, each file once
    decode      probe videos; decoder processes: PyAV/OpenCV, rotation, deinterlace
    gpulibs     CUDA, cuDNN, TensorRT libraries: loaded from pip wheels or the system, reported
    providers   ONNX Runtime providers that really load, sessions, TensorRT engine cache, GPUs
    detect      letterbox, SCRFD decoding, NMS, alignment, ArcFace embeddings (CPU path)
    device      frames on the models' device: letterbox/candidate/alignment graphs, IO binding
    models      find the pack, detector vs recognizer, batch-capable detector, load for a worker
    references  reference photos -> one Reference (embeddings) per person
    tracks      face tracks and which faces are embedded when (the index stage knows no photo)
    worker      worker processes and threads, FrameSequencer (frames to the tracker in order)
    index       one Parquet file per video: faces, tracks, looks (embeddings); atomic writes, checks
    naming      the matching rules: looks' distances -> named track pieces, sightings, snapshot looks
    search      references x stored looks: track templates, candidates, exact distances
    clips       sightings -> time ranges -> ffmpeg clips
    reports     results.json, results.csv, index.html, the summary table
    resume      made.json per video folder: which snapshots and clips a rerun reuses; fingerprints
    snapshots   the frames of the best looks decoded again at search time, boxed and labelled
    people      the unnamed tracks grouped into people (--people, --name-person)
    runstate    the parent's record of a run, filled from the children's messages; the finisher
                thread (index written, search, snapshots, clips)
    pipeline    start the processes and queues, read messages, notice dead children, shut down
    indexer     on a Ray node (--ray): the actor that keeps a pipeline for video after video
    cluster     the index stage on a Ray cluster: join, check the nodes, give out videos, retry
    run         one run from start to end: inputs, indexes reused or made, search, reports, exit code
    doctor      --check and --demo

Where a change goes:

    a new execution provider, or a TensorRT option      providers.py (model wiring: models.py)
    a new detector layout or NMS rule                   detect.py (the GPU path: device.py)
    a new video container, codec workaround or decoder  decode.py
    a new video extension, or how links are followed    folders.py
    when a face is embedded (which looks are stored)    tracks.py
    how a track is named, what counts as a sighting     naming.py
    a new clip mode or ffmpeg argument                  clips.py (its setting: main.py + settings.py)
    a new column or metadata field of the index         index.py (its schema: docs/index.md)
    how stored looks are matched against references    search.py
    a new field in results.json / results.csv / HTML    reports.py
    a new setting                                       main.py's block, then settings.py's limits
    a new process, queue or message                     pipeline.py and runstate.py
    how videos are given to Ray nodes, retried          cluster.py (on the node: indexer.py)
    a new line in --check                               doctor.py
    how unnamed faces are grouped into people           people.py
    a new onnxruntime-gpu, CUDA or TensorRT version       requirements-gpu*.txt + docs/gpu.md's table
    how CUDA/cuDNN/TensorRT libraries are found/loaded   gpulibs.py
"""
