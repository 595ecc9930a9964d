"""Loading configs: a config file by path or shipped name, or a run's `config.json`; `a.b=value`
overrides (the CLI's `--config.a.b=value`); validation; the loaded config is locked.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from collections.abc import Iterable

import ml_collections

from m2det_jax.config.checks import validate
from m2det_jax.config.defaults import default_config


def _parse_value(text: str, current):
    """Parses an override string into the type of the current value."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ValueError(f"cannot parse {text!r}") from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    elif isinstance(current, tuple) and not isinstance(value, tuple):
        value = (value,)  # "classes=3": a one-element tuple
    return value


def _closest(name: str, options: Iterable[str]) -> str:
    """' (did you mean "x"?)' for the option closest to a misspelt name, else ''."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Applies `a.b=value` overrides in place; an unknown field is an error that names the
    closest valid one."""
    for item in overrides:
        item = item[len("--config."):] if item.startswith("--config.") else item
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected field=value")
        path, text = item.split("=", 1)
        node, done = cfg, []
        for p in path.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or p not in node:
                keys = node.keys() if isinstance(node, ml_collections.ConfigDict) else ()
                raise ValueError(f"override {item!r}: unknown config field {path!r}"
                                 + _closest(p, keys))
            parent, node = node, node[p]
            done.append(p)
        try:
            parent[done[-1]] = _parse_value(text, node)
        except (ValueError, TypeError) as e:
            raise ValueError(f"override {item!r}: {e}") from None


def unknown_fields(cfg: ml_collections.ConfigDict) -> list[str]:
    """Fields of `cfg` that `default_config()` does not have (a misspelt name in a config
    file adds a new field silently; loading refuses it), each with the closest valid name."""

    def walk(node, ref, prefix):
        for k in node.keys():
            if k not in ref:
                yield f"{prefix}{k}{_closest(k, ref.keys())}"
            elif isinstance(node[k], ml_collections.ConfigDict) and isinstance(
                    ref[k], ml_collections.ConfigDict):
                yield from walk(node[k], ref[k], f"{prefix}{k}.")

    return list(walk(cfg, default_config(), ""))


def _finish(cfg: ml_collections.ConfigDict, source: str, overrides: Iterable[str]):
    """Checks that every field is a known one, applies overrides, validates, locks."""
    unknown = unknown_fields(cfg)
    if unknown:
        raise ValueError(f"config {source}: unknown field(s) " + ", ".join(unknown))
    apply_overrides(cfg, overrides)
    validate(cfg)
    cfg.lock()  # a misspelt field read or set later is an error naming the closest one
    return cfg


def configs_dir() -> str:
    """The folder of the shipped configs: the repository's configs/ (a source checkout or
    an editable install), else the installed `m2det_jax.configs` package."""
    repo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    if os.path.isfile(os.path.join(repo, "shapes.py")):
        return repo
    spec = importlib.util.find_spec("m2det_jax.configs")
    return os.path.dirname(spec.origin) if spec and spec.origin else repo


def shipped_configs() -> dict[str, str]:
    """{name: path} of every shipped config, sorted by name."""
    d = configs_dir()
    files = os.listdir(d) if os.path.isdir(d) else []
    names = sorted(f[:-3] for f in files if f.endswith(".py") and not f.startswith("_"))
    return {n: os.path.join(d, n + ".py") for n in names}


def _merge_json(cfg: ml_collections.ConfigDict, values: dict, where: str = "") -> None:
    """Sets `values` (a config's JSON) into `cfg`, JSON lists back to tuples where the
    default is a tuple."""

    def restore(v, like):
        if isinstance(v, list) and (isinstance(like, tuple) or like is None):
            return tuple(restore(x, None) for x in v)
        return v

    for k, v in values.items():
        cur = cfg[k] if k in cfg else None  # a stored field unknown here: kept as is
        if isinstance(cur, ml_collections.ConfigDict) and isinstance(v, dict):
            _merge_json(cur, v, f"{where}{k}.")
        else:
            try:
                cfg[k] = restore(v, cur)
            except (TypeError, KeyError) as e:
                raise ValueError(f"config field {where}{k}={v!r}: {e}") from None


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """A config from its JSON (a run's `config.json`): the defaults with every stored
    value set."""
    cfg = default_config()
    with cfg.unlocked():
        _merge_json(cfg, json.loads(text))
    return cfg


def run_config_file(checkpoint: str | os.PathLike) -> str | None:
    """The `config.json` a training workdir or an `m2det export` folder holds (the config
    its checkpoint was written with), or None."""
    path = os.path.join(os.fspath(checkpoint), "config.json")
    return path if os.path.isfile(path) else None


def load_config(
    path: str | os.PathLike, overrides: Iterable[str] = ()
) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a config file by path, applies overrides, validates.

    Args:
      path: a config `.py` file (e.g. "configs/m2det512_vgg.py"), or a run's
        `config.json`. A bare shipped name such as "m2det512_vgg" is also found among
        the shipped configs (`configs_dir()`).
      overrides: strings "a.b=value" (a leading "--config." is accepted).
    """
    path = os.fspath(path)
    if path.endswith(".json"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as f:
            cfg = config_from_json(f.read())
        return _finish(cfg, path, overrides)
    if not os.path.exists(path):
        here = configs_dir()
        name = os.path.basename(path)
        cand = os.path.join(here, name if name.endswith(".py") else name + ".py")
        if not os.path.exists(cand):
            raise FileNotFoundError(f"config file not found: {path}")
        path = cand
    spec = importlib.util.spec_from_file_location(
        "m2det_config_" + os.path.splitext(os.path.basename(path))[0], path
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config()")
    return _finish(module.get_config(), path, overrides)
