"""What a training run writes next to its checkpoints, on any filesystem (`paths`):
`config.json`, `command.txt`, `metrics.jsonl` and TensorBoard events.

On a local disk metrics.jsonl is appended line by line. Object stores (gs://, s3://) have
no append: there the file is kept in memory (after reading what a resumed run already
wrote) and uploaded whole at each write; TensorBoard event files the same way, through a
tensorboardX writer factory that goes through epath.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys

import numpy as np
from etils import epath
from tensorboardX import SummaryWriter, record_writer

from m2det_jax.paths import as_path, is_uri


class _EpathRecordWriter:
    """A TensorBoard event file on an object store: buffered, uploaded whole on flush."""

    def __init__(self, path: str):
        self._path = epath.Path(path)
        self._buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        self._path.write_bytes(self._buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EpathWriterFactory:
    def open(self, path: str) -> _EpathRecordWriter:
        return _EpathRecordWriter(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


for _scheme in ("gs", "s3", "az", "hf"):  # tensorboardX's own gs/s3 writers need other SDKs
    record_writer.register_writer_factory(_scheme, _EpathWriterFactory())


class MetricsLog:
    """metrics.jsonl + TensorBoard scalars (process 0 only)."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        self._path = as_path(workdir) / "metrics.jsonl"
        self._remote = is_uri(os.fspath(self._path))
        if self._remote:
            self._lines = self._path.read_text() if self._path.exists() else ""
        else:
            self._file = open(self._path, "a")  # noqa: SIM115 - local disk: append
        self._tb = SummaryWriter(os.fspath(as_path(workdir) / "tensorboard"))

    def write(self, step: int, row: dict[str, float], prefix: str = "train"):
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in row.items()}}
        line = json.dumps(row) + "\n"
        if self._remote:
            self._lines += line
            self._path.write_text(self._lines)
        else:
            self._file.write(line)
            self._file.flush()
        for k, v in row.items():
            if k != "step" and math.isfinite(v):
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
        self._tb.flush()

    def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """TensorBoard images (uint8 [H, W, 3]) at `step`, e.g. sample detections."""
        if not self.enabled:
            return
        for tag, im in images.items():
            self._tb.add_image(tag, np.asarray(im), step, dataformats="HWC")
        self._tb.flush()

    def close(self):
        if self.enabled:
            if not self._remote:
                self._file.close()
            self._tb.close()


def write_run_info(workdir: str | os.PathLike, cfg) -> None:
    """`config.json` (the resolved config) and one more line of `command.txt`."""
    wd = as_path(workdir)
    (wd / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    cmd = wd / "command.txt"
    before = cmd.read_text() if cmd.exists() else ""
    line = " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\n"
    cmd.write_text(before + line)
