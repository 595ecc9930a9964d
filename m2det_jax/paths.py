"""User paths on any filesystem, through `etils.epath` (what orbax uses).

A path the user gives (workdir, checkpoint, export folder, annotation file, TFDS
`data_dir`, detect output) may be local or a URI such as `gs://bucket/run` (also `s3://`,
`az://`, `hf://`: whatever epath's backends serve). Local paths get `~` expanded and are
made absolute, so a run's files do not depend on the current directory later; URIs are
kept exactly as given (`os.path.abspath("gs://b/run")` would give `./gs:/b/run`).

Writes go through `write_text` / `write_bytes` / `open(mode="w")`: object stores have no
append and no rename, so anything that grows (metrics.jsonl, TensorBoard events) is
rewritten whole on remote filesystems (`train.writers`).
"""

from __future__ import annotations

import os
import re

from etils import epath

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(path: str | os.PathLike) -> bool:
    """Whether `path` names a remote filesystem (`scheme://...`)."""
    return bool(_URI.match(os.fspath(path)))


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an `epath.Path`: URIs unchanged, local paths expanded and absolute."""
    if isinstance(path, epath.Path) and is_uri(os.fspath(path)):
        return path
    s = os.fspath(path)
    if is_uri(s):
        return epath.Path(s)
    return epath.Path(os.path.abspath(os.path.expanduser(s)))


def as_str(path: str | os.PathLike) -> str:
    """`as_path(path)` as a string (for libraries that take strings: TFDS, tensorboardX)."""
    return os.fspath(as_path(path))


def join(path: str | os.PathLike, *parts: str) -> epath.Path:
    """`as_path(path) / parts...`."""
    p = as_path(path)
    for part in parts:
        p = p / part
    return p


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` so that no reader sees half of it: locally through a
    temporary file and a rename; on object stores a single upload already is atomic."""
    p = as_path(path)
    if is_uri(os.fspath(p)):
        p.write_text(text)
        return
    tmp = p.parent / f".{p.name}.tmp{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(p)
