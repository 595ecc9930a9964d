"""Video files, cameras and streams through the detector (`m2det detect --input`).

`is_video_source` tells a video file (by extension), a camera index ("0") or a stream URL
(rtsp://, http(s)://, ...) from images. `detect_video` reads frames with OpenCV's
`VideoCapture` in order, runs them through a `Detector` in its batches, and writes
`<name>.mp4` (the frames with labelled boxes, the source's frame rate and size) and
`detections.jsonl` (one line per frame: frame index, time in seconds, detections). A frame
that fails to decode inside a file is skipped and counted (the stream goes on until
`MAX_FAILED_READS` reads in a row fail); Ctrl-C and the end of the stream stop it cleanly,
with every frame read so far written.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from m2det_jax.paths import as_path

_log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg",
                    ".wmv", ".flv", ".ts")  # fmt: skip
STREAM_SCHEMES = ("rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://")
MAX_FAILED_READS = 25


def is_video_source(source: str) -> bool:
    """A camera index, a stream URL or a file with a video extension."""
    s = str(source)
    return (s.isdigit() or s.lower().startswith(STREAM_SCHEMES)
            or s.lower().endswith(VIDEO_EXTENSIONS))  # fmt: skip


def _open(source: str) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(int(source) if str(source).isdigit() else str(source))
    if not cap.isOpened():
        raise FileNotFoundError(f"cannot open video source {source!r}")
    return cap


def _frames(cap: cv2.VideoCapture, counts: dict[str, int], max_frames: int):
    """(index, RGB frame) in order; failed reads inside a file are skipped and counted."""
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)  # 0 for cameras and streams
    index, failed = 0, 0
    while max_frames <= 0 or counts["frames"] < max_frames:
        ok, frame = cap.read()
        if not ok or frame is None or frame.size == 0:
            if not total or index >= total:
                return  # the end of a file, a camera or a stream
            failed += 1  # inside a file: a frame that does not decode
            counts["skipped_frames"] += 1
            index += 1
            if failed >= MAX_FAILED_READS:
                return
            continue
        failed = 0
        counts["frames"] += 1
        yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        index += 1


def detect_video(detector, source: str, output_dir: str, *, max_frames: int = 0,
                 show: bool = False,
                 log: Callable[[str], Any] = print) -> dict[str, Any]:  # fmt: skip
    """Runs `detector` (an `m2det_jax.Detector`) over the frames of `source`; writes the
    annotated video and detections.jsonl into `output_dir`. Returns {"video", "jsonl",
    "frames", "skipped_frames", "fps" (of the source), "seconds", "interrupted"}."""
    cap = _open(source)
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    fps = fps if 0.0 < fps < 1000.0 else 25.0  # cameras and some streams do not say
    out_dir = as_path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"camera{source}" if str(source).isdigit() else os.path.splitext(
        os.path.basename(str(source).split("?")[0].rstrip("/")))[0] or "stream"
    video_path = os.path.join(os.fspath(out_dir), f"{stem}.mp4")
    jsonl_path = os.path.join(os.fspath(out_dir), "detections.jsonl")
    counts = {"frames": 0, "skipped_frames": 0}
    writer = None
    interrupted = False
    t0 = time.perf_counter()
    pending: list[tuple[int, np.ndarray]] = []

    def flush(lines) -> None:
        nonlocal writer
        if not pending:
            return
        results = detector([f for _, f in pending])
        for (i, frame), r in zip(pending, results, strict=True):
            drawn = cv2.cvtColor(np.asarray(r.draw(frame)), cv2.COLOR_RGB2BGR)
            if writer is None:
                h, w = frame.shape[:2]
                writer = cv2.VideoWriter(video_path, cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                         (w, h))  # fmt: skip
            writer.write(drawn)
            lines.write(json.dumps({"frame": i, "time": round(i / fps, 4),
                                    "detections": r.to_json()}) + "\n")  # fmt: skip
            if show:
                cv2.imshow("m2det", drawn)
                cv2.waitKey(1)
        pending.clear()
        seconds = time.perf_counter() - t0
        log(f"frame {counts['frames']}: {counts['frames'] / max(seconds, 1e-9):.1f} FPS")

    with open(jsonl_path, "w") as lines:
        try:
            for i, frame in _frames(cap, counts, max_frames):
                pending.append((i, frame))
                if len(pending) >= detector.batch_size:
                    flush(lines)
            flush(lines)
        except KeyboardInterrupt:  # keep what was read: the frames so far are written
            interrupted = True
            flush(lines)
        finally:
            cap.release()
            if writer is not None:
                writer.release()
            if show:
                cv2.destroyAllWindows()
    if counts["skipped_frames"]:
        _log.warning("%s: %d frames could not be decoded and were skipped", source,
                     counts["skipped_frames"])  # fmt: skip
    return {"video": video_path if writer is not None else None, "jsonl": jsonl_path,
            "fps": fps, "seconds": time.perf_counter() - t0, "interrupted": interrupted,
            **counts}  # fmt: skip
