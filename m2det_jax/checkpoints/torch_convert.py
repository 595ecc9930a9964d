"""Official PyTorch checkpoints -> Flax variables, strictly.

Accepted inputs (a mapping key -> array/tensor, or a `.pth`/`.npz` path):
  * a full official M2Det state_dict (keys `unet1.*`, `base.*`, `leach.*`, `loc.*`, ...),
    with or without the `module.` prefix of multi-GPU checkpoints;
  * SSD's `vgg16_reducedfc.pth` (keys `0.weight` ... `33.bias`): VGG backbone only;
  * torchvision ResNet ImageNet weights (`conv1.weight`, `layer1.0.*`, `fc.*`): backbone only.

Unlike the original (which loads with strict=False), every unknown key, missing key and
shape mismatch is an error that lists all offenders. `.pth` files are read with
`torch.load(weights_only=True)`: no arbitrary objects are unpickled.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from m2det_jax.errors import CheckpointMismatchError
from m2det_jax.models import abstract_variables
from m2det_jax.models.backbones import RESNET_SPECS, VGG_TORCH_INDEX

# Entries that exist in state_dicts but carry nothing we need.
_IGNORED_LEAVES = ("num_batches_tracked",)




def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch.Tensor, without importing torch
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `.pth` (safely, tensors only) or `.npz` state_dict into numpy arrays."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"reading {path} needs PyTorch: pip install 'm2det-jax[torch]' "
            "(or save the state_dict as .npz)"
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError for anything but tensors/containers
        raise ValueError(
            f"refusing to load {path}: it is not a plain tensor state_dict "
            f"(weights_only loading failed: {str(e).splitlines()[0]})"
        ) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state_dict mapping, got {type(obj).__name__}")
    return {str(k): _to_numpy(v) for k, v in obj.items()}


# ---------------------------------------------------------------------------------------
# Key mapping: torch key -> (collection, flax path, kind)
# kind: "conv" (OIHW -> HWIO), "vec" (as is).

Target = tuple[str, tuple[str, ...], str]


def _basic_conv(table: dict, torch_prefix: str, flax_path: tuple[str, ...]) -> None:
    table[f"{torch_prefix}.conv.weight"] = ("params", (*flax_path, "conv", "kernel"), "conv")
    _bn(table, f"{torch_prefix}.bn", (*flax_path, "bn"))


def _bn(table: dict, torch_prefix: str, flax_path: tuple[str, ...]) -> None:
    table[f"{torch_prefix}.weight"] = ("params", (*flax_path, "scale"), "vec")
    table[f"{torch_prefix}.bias"] = ("params", (*flax_path, "bias"), "vec")
    table[f"{torch_prefix}.running_mean"] = ("batch_stats", (*flax_path, "mean"), "vec")
    table[f"{torch_prefix}.running_var"] = ("batch_stats", (*flax_path, "var"), "vec")


def _conv(table: dict, torch_prefix: str, flax_path: tuple[str, ...], bias=True) -> None:
    table[f"{torch_prefix}.weight"] = ("params", (*flax_path, "kernel"), "conv")
    if bias:
        table[f"{torch_prefix}.bias"] = ("params", (*flax_path, "bias"), "vec")


def _backbone_table(cfg) -> dict[str, Target]:
    """Keys of the backbone as the original names them (`base.*`)."""
    t: dict[str, Target] = {}
    name = cfg.model.backbone
    if name == "vgg16":
        for layer, idx in VGG_TORCH_INDEX.items():
            _conv(t, f"base.{idx}", ("backbone", layer))
        return t
    blocks, bottleneck = RESNET_SPECS[int(name[6:])]
    _conv(t, "base.conv1", ("backbone", "conv1"), bias=False)
    _bn(t, "base.bn1", ("backbone", "bn1"))
    for stage, n in enumerate(blocks):
        for k in range(n):
            tp, fp = f"base.layer{stage + 1}.{k}", ("backbone", f"layer{stage + 1}_{k}")
            for j in range(1, 4 if bottleneck else 3):
                _conv(t, f"{tp}.conv{j}", (*fp, f"conv{j}"), bias=False)
                _bn(t, f"{tp}.bn{j}", (*fp, f"bn{j}"))
            stride = (1, 2, cfg.model.resnet_layer3_stride, 2)[stage]
            in_ch = (64, 256, 512, 1024)[stage] if bottleneck else (64, 64, 128, 256)[stage]
            out_ch = (64, 128, 256, 512)[stage] * (4 if bottleneck else 1)
            if k == 0 and (stride != 1 or in_ch != out_ch):
                _conv(t, f"{tp}.downsample.0", (*fp, "downsample_conv"), bias=False)
                _bn(t, f"{tp}.downsample.1", (*fp, "downsample_bn"))
    return t


def key_table(cfg) -> tuple[dict[str, Target], dict[str, list[str]]]:
    """The full mapping for `cfg`, plus groups of torch keys that must hold equal arrays.

    Returns:
      table: torch key (no `module.` prefix) -> (collection, flax path, kind).
      aliases: canonical torch key -> the other keys that alias it in the original (the
        shared leach / SFAM copies), when the config shares those modules.
    """
    m = cfg.model
    t = _backbone_table(cfg)
    aliases: dict[str, list[str]] = {}
    for lvl in range(m.num_levels):
        tp, fp = f"unet{lvl + 1}", (f"tum_{lvl}",)
        for i in range(m.num_scales - 1):
            _basic_conv(t, f"{tp}.layers.{i}", (*fp, f"encoder_{i}"))
        _basic_conv(t, f"{tp}.toplayer.0", (*fp, "top"))
        for i in range(m.num_scales - 1):
            _basic_conv(t, f"{tp}.latlayer.{i}", (*fp, f"lateral_{i}"))
        if m.smooth:
            for i in range(m.num_scales - 1):
                _basic_conv(t, f"{tp}.smooth.{i}", (*fp, f"smooth_{i}"))
    _basic_conv(t, "reduce", ("ffmv1", "reduce"))
    _basic_conv(t, "up_reduce", ("ffmv1", "up_reduce"))
    _bn(t, "Norm", ("norm",))
    for lvl in range(m.num_levels):
        _basic_conv(t, f"leach.{lvl}", ("ffmv2" if m.share_ffmv2 else f"ffmv2_{lvl}", "conv"))
    for s in range(m.num_scales):
        _conv(t, f"loc.{s}", (f"loc_{s}",))
        _conv(t, f"conf.{s}", (f"conf_{s}",))
    if m.sfam:
        for s in range(m.num_scales):
            sfx = "" if m.share_sfam else f"_{s}"
            _conv(t, f"sfam_module.fc1.{s}", ("sfam", "fc1" + sfx))
            _conv(t, f"sfam_module.fc2.{s}", ("sfam", "fc2" + sfx))
    shared = []
    if m.share_ffmv2:
        shared.append((r"^leach\.(\d+)\.", "leach.0."))
    if m.sfam and m.share_sfam:
        shared += [(r"^sfam_module\.fc1\.(\d+)\.", "sfam_module.fc1.0."),
                   (r"^sfam_module\.fc2\.(\d+)\.", "sfam_module.fc2.0.")]  # fmt: skip
    for key in t:
        for pat, rep in shared:
            canon = re.sub(pat, rep, key)
            if canon != key:
                aliases.setdefault(canon, []).append(key)
    return t, aliases


def _detect_format(keys: list[str]) -> str:
    if any(k.startswith(("unet", "leach.", "Norm.", "conf.", "loc.")) for k in keys):
        return "m2det"
    if keys and all(re.match(r"^\d+\.(weight|bias)$", k) for k in keys):
        return "vgg"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "resnet"
    return "unknown"


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _abstract_shapes(cfg) -> dict[str, Any]:
    return jax.tree.map(lambda x: tuple(x.shape), abstract_variables(cfg))


def _lookup(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def convert_torch_state_dict(
    state_dict: Mapping[str, Any] | str | os.PathLike, cfg
) -> dict[str, Any]:
    """Converts an official state_dict to Flax variables for `cfg`, strictly.

    Args:
      state_dict: mapping from the original's keys (optionally `module.`-prefixed) to numpy
        arrays or torch tensors, or a `.pth` / `.npz` path.
      cfg: the config the weights are for (its model section must match the checkpoint).

    Returns:
      {"params": ..., "batch_stats": ...} as nested dicts of float32 numpy arrays. For a
      full M2Det checkpoint this is the whole model; for a backbone-only file (VGG reduced-fc
      or torchvision ResNet) only the "backbone" subtrees are present (see
      `merge_variables`).

    Raises:
      CheckpointMismatchError: listing every unknown key, missing key and wrong shape.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = load_state_dict_file(state_dict)
    sd = {}
    for k, v in state_dict.items():
        k = str(k)
        sd[k[len("module."):] if k.startswith("module.") else k] = v

    fmt = _detect_format(list(sd))
    backbone = cfg.model.backbone
    if fmt == "vgg":
        if backbone != "vgg16":
            raise CheckpointMismatchError(
                f"this is a VGG16 backbone file but model.backbone={backbone!r}")
        sd = {f"base.{k}": v for k, v in sd.items()}
    elif fmt == "resnet":
        if not backbone.startswith("resnet"):
            raise CheckpointMismatchError(
                f"this is a torchvision ResNet file but model.backbone={backbone!r}")
        sd = {f"base.{k}": v for k, v in sd.items()}
    elif fmt == "unknown":
        sample = ", ".join(sorted(sd)[:5])
        raise CheckpointMismatchError(
            "not an M2Det, VGG16-reducedfc or torchvision ResNet state_dict "
            f"(first keys: {sample})")

    table, aliases = key_table(cfg)
    if fmt != "m2det":
        table = {k: v for k, v in table.items() if k.startswith("base.")}
    ignorable = {k for k in sd if k.endswith(_IGNORED_LEAVES)}
    if backbone.startswith("resnet"):
        ignorable |= {k for k in sd if k in ("base.fc.weight", "base.fc.bias")}

    unknown = sorted(k for k in sd if k not in table and k not in ignorable)
    missing = sorted(k for k in table if k not in sd)
    abstract = _abstract_shapes(cfg)
    wrong = []
    out: dict[str, Any] = {}
    for key, (coll, path, kind) in table.items():
        if key not in sd:
            continue
        arr = _to_numpy(sd[key])
        if kind == "conv":
            if arr.ndim == 2:  # Linear-style 1x1 weights
                arr = arr[:, :, None, None]
            arr = arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr
        want = _lookup(abstract[coll], path)
        if tuple(arr.shape) != want:
            wrong.append(f"{key}: checkpoint {tuple(sd[key].shape)} -> {tuple(arr.shape)}, "
                         f"model {'/'.join(path)} expects {want}")  # fmt: skip
            continue
        _set(out.setdefault(coll, {}), path, np.asarray(arr, np.float32))

    differ = []
    for canon, keys in aliases.items():
        if canon not in sd:
            continue
        ref = _to_numpy(sd[canon])
        for k in keys:
            if k in sd and k != canon and not np.array_equal(_to_numpy(sd[k]), ref):
                differ.append(k)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s): " + ", ".join(unknown))
    if missing:
        problems.append(f"{len(missing)} missing key(s): " + ", ".join(missing))
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): " + "; ".join(wrong))
    if differ:
        problems.append(
            f"{len(differ)} key(s) differ from their shared copy (the config shares "
            "FFMv2/SFAM; set model.share_ffmv2=False / model.share_sfam=False): "
            + ", ".join(differ))
    if problems:
        raise CheckpointMismatchError(
            f"state_dict does not fit config (backbone={backbone}, "
            f"num_classes={cfg.model.num_classes}, planes={cfg.model.planes}, "
            f"num_levels={cfg.model.num_levels}, sfam={cfg.model.sfam}):\n  "
            + "\n  ".join(problems))
    return out




def to_torch_state_dict(variables: Mapping[str, Any], cfg) -> dict[str, np.ndarray]:
    """The inverse of `convert_torch_state_dict` for a full model: the original's keys
    (every shared copy listed, `num_batches_tracked` = 0) with NCHW/OIHW numpy arrays.

    Useful to hand weights trained here back to the PyTorch code.
    """
    table, _ = key_table(cfg)
    out: dict[str, np.ndarray] = {}
    for key, (coll, path, kind) in table.items():
        arr = np.asarray(_lookup(variables[coll], path), np.float32)
        if kind == "conv":
            arr = arr.transpose(3, 2, 0, 1)
        out[key] = arr
        if key.endswith(".running_var"):
            out[key[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return out
