"""Two import helpers the package's `__init__` files use.

* `lazy_exports`: a package's public names, each imported from its module on first use
  (PEP 562), so importing one light submodule (say `m2det_jax.data.records`) does not pull
  in TFDS, grain or orbax through the package's `__init__`.
* `MOVED` and `install_aliases`: the module paths of earlier releases (`m2det_jax.predict`,
  `m2det_jax.postprocess`, `m2det_jax.voc_eval`, ...) keep importing: each resolves to the
  module or package that now holds its names, the same module object (not a copy).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Mapping

# Earlier module path -> where its names live now (a package exports every public name of a
# module that was split into it). Submodules follow their parent (postprocess.plain too).
MOVED = {
    "accumulate": "train.accumulate",
    "annotate": "inference.image_files",
    "benchmark": "perf.benchmark",
    "box_ops": "core.box_ops",
    "coco_eval": "evaluation.coco",
    "config_checks": "config.checks",
    "convert": "checkpoints.torch_convert",
    "costs": "perf.costs",
    "data.augment": "data.augment_host",
    "data.coco_folder": "data.sources.coco_folder",
    "data.device_augment": "data.augment_device",
    "data.shapes": "data.sources.shapes",
    "data.voc": "evaluation.voc",
    "data.voc_folder": "data.sources.voc_folder",
    "evaluate": "evaluation",
    "export": "inference.export",
    "losses": "train.losses",
    "optim": "train.optim",
    "postprocess": "inference.postprocess",
    "predict": "inference",
    "preprocess": "core.preprocess",
    "priors": "core.priors",
    "profiling": "train.profiling",
    "runlog": "train.writers",
    "runtime": "perf.runtime",
    "sharding": "distributed",
    "stats": "perf.stats",
    "throughput": "train.meter",
    "train_step": "train.step",
    "verify": "perf.verify",
    "voc_eval": "evaluation.voc",
}


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable, Callable]:
    """(__getattr__, __dir__) for `package`: name -> its submodule (relative name)."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__


def _target(fullname: str, root: str) -> str | None:
    rel = fullname[len(root) + 1:] if fullname.startswith(root + ".") else None
    if rel is None:
        return None
    for old, new in MOVED.items():
        if rel == old or rel.startswith(old + "."):
            return f"{root}.{new}{rel[len(old):]}"
    return None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return None  # a placeholder; exec_module puts the real module in its place

    def exec_module(self, module):
        sys.modules[module.__name__] = importlib.import_module(self.target)


class _AliasFinder(importlib.abc.MetaPathFinder):
    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        new = _target(fullname, self.root)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install_aliases(root: str) -> Callable[[str], object]:
    """Makes the earlier module paths under `root` importable; returns a module
    `__getattr__` for `root` (so `m2det_jax.predict` works as an attribute too)."""
    if not any(isinstance(f, _AliasFinder) and f.root == root for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder(root))  # before the path finder: no second copy

    def __getattr__(name: str):
        if name in MOVED:
            return importlib.import_module(f"{root}.{name}")
        raise AttributeError(f"module {root!r} has no attribute {name!r}")

    return __getattr__
