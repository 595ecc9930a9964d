import os
import re
import subprocess
import sys

import numpy as np
import pytest

from m2det_jax import load_config
from m2det_jax.config import apply_overrides, default_config
from tests.helpers import CONFIGS, config_path

SHIPPED = sorted(f[:-3] for f in os.listdir(CONFIGS) if f.endswith(".py") and f[0] != "_")


def _expected(name: str) -> dict:
    """What a shipped config's name promises: input size, backbone, class count."""
    if name == "shapes":
        return {"input_size": 128, "num_classes": 5, "dataset": "shapes"}
    if name == "tiny":
        return {"input_size": 64, "backbone": "resnet18", "num_classes": 4}
    m = re.fullmatch(r"m2det(\d+)_(vgg|resnet101)(_voc)?", name)
    assert m, f"unexpected shipped config name {name}"
    return {"input_size": int(m[1]), "backbone": {"vgg": "vgg16"}.get(m[2], m[2]),
            "num_classes": 21 if m[3] else 81,
            "dataset": "voc" if m[3] else "coco/2017"}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_what_its_name_says(name):
    cfg = load_config(config_path(name))
    got = {"input_size": cfg.model.input_size, "backbone": cfg.model.backbone,
           "num_classes": cfg.model.num_classes, "dataset": cfg.data.dataset}
    want = _expected(name)
    assert {k: got[k] for k in want} == want
    assert cfg.is_locked


def test_a_loaded_config_is_locked_and_names_the_closest_field():
    cfg = load_config(config_path("tiny"))
    with pytest.raises(AttributeError, match="batch_size"):
        cfg.train.batch_sise  # noqa: B018
    with pytest.raises(AttributeError, match="cannot be added"):
        cfg.train.batch_sise = 4
    cfg.train.batch_size = 4  # existing fields stay settable
    assert cfg.train.batch_size == 4


def test_a_misspelt_field_in_a_config_file_is_refused(tmp_path):
    f = tmp_path / "typo.py"
    f.write_text("from m2det_jax.config import default_config\n\n\ndef get_config():\n"
                 "    c = default_config()\n    c.train.batch_sise = 8\n    return c\n")
    with pytest.raises(ValueError, match=r"typo.py: unknown field\(s\) train.batch_sise "
                                         r"\(did you mean 'batch_size'\?\)"):
        load_config(f)


def test_an_unknown_override_names_the_closest_field():
    with pytest.raises(ValueError, match=r"unknown config field 'train.batch_sise' "
                                         r"\(did you mean 'batch_size'\?\)"):
        load_config(config_path("tiny"), ["train.batch_sise=8"])


def test_defaults_are_not_restated_where_fields_are_read():
    """Every default lives in `config.defaults`: no `cfg.<section>.get(field, default)`."""
    pattern = re.compile(r"\bcfg(\.\w+)*\.get\(|cfg\[[^]]+\]\.get\(")
    pkg = os.path.join(os.path.dirname(CONFIGS), "m2det_jax")
    hits = [f"{os.path.relpath(os.path.join(d, f), pkg)}:{i}"
            for d, _, files in os.walk(pkg) for f in files if f.endswith(".py")
            for i, line in enumerate(open(os.path.join(d, f)), 1) if pattern.search(line)]
    assert not hits, hits
    assert pattern.search('x = cfg.train.get("remat", "none")')


def test_loads_by_path_from_any_directory(tmp_path):
    code = (
        "import m2det_jax; c = m2det_jax.load_config({!r}, ['model.input_size=512']); "
        "print(c.model.input_size)".format(config_path("m2det320_vgg"))
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "512"


def test_packages_listed_in_pyproject_are_every_package_folder():
    import tomllib

    from tests.helpers import ROOT

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {os.path.relpath(d, ROOT).replace(os.sep, ".")
             for d, _, files in os.walk(os.path.join(ROOT, "m2det_jax")) if "__init__.py" in files}  # fmt: skip
    assert listed == found | {"m2det_jax.configs"}


@pytest.mark.slow
def test_bare_config_names_after_a_non_editable_install(tmp_path):
    """A wheel of the project installed (no deps) into a folder of its own: bare shipped
    names load from any directory, and `m2det summary --all` lists every shipped config."""
    from tests.helpers import ROOT

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), ROOT], check=True, capture_output=True, timeout=600)  # fmt: skip
    assert (site / "m2det_jax" / "configs" / "m2det512_vgg_voc.py").is_file()
    assert not (site / "configs").exists()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (f"import m2det_jax, m2det_jax.config as c; assert m2det_jax.__file__.startswith({str(site)!r}); "
            "cfg = m2det_jax.load_config('m2det512_vgg'); print(cfg.model.input_size, "
            f"sorted(c.shipped_configs()) == {SHIPPED!r})")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                         capture_output=True, check=True)  # fmt: skip
    assert out.stdout.split() == ["512", "True"]


def test_overrides_are_typed():
    c = default_config()
    apply_overrides(c, ["model.sfam=true", "train.base_lr=1", "anchors.steps=(8,16,32,64,128,256)",
                        "--config.postprocess.method=hard"])  # fmt: skip
    assert c.model.sfam is True and c.train.base_lr == 1.0
    assert c.anchors.steps == (8, 16, 32, 64, 128, 256)
    assert c.postprocess.method == "hard"


@pytest.mark.parametrize(
    "override,match",
    [
        ("model.bogus=1", "unknown config field 'model.bogus'"),
        ("model.backbone=vgg19", "model.backbone='vgg19'"),
        ("model.num_scales=2", "model.num_scales=2"),
        ("model.planes=255", "model.planes=255"),
        ("postprocess.method=fast", "postprocess.method='fast'"),
        ("model.sfam=maybe", "model.sfam=maybe"),
        ("train.batch_size=0", "train.batch_size=0: an integer >= 1"),
        ("train.log_every=0", "train.log_every=0"),
        ("train.checkpoint_every=0", "train.checkpoint_every=0"),
        ("data.eval_batch_size=-8", "data.eval_batch_size=-8"),
        ("train.num_steps=-1", "train.num_steps=-1"),
        ("data.metric=map", "data.metric='map'"),
        ("data.extra_train_sets=(('voc/2012',),)", "data.extra_train_sets: .*is not a"),
    ],
)
def test_bad_values_name_field_and_value(override, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        load_config(config_path("m2det320_vgg"), [override])


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config("nope.py")


def test_shapes_anchors_give_several_positives_per_object():
    """The embedded default's anchors and matching threshold (configs/shapes.py) give
    ~12 positive priors per ground-truth object on the generated set, where the 320
    ladder extrapolated to 4 scales at IoU 0.5 gave ~1.6 (the from-scratch plateau)."""
    import jax.numpy as jnp

    import m2det_jax
    from m2det_jax.data.sources.shapes import make_example
    from m2det_jax.train.losses import match

    boxes, labels, valid = [], [], []
    for i in range(100):
        _, b, lab = make_example(0, "train", i)
        bb, ll, vv = np.zeros((8, 4), np.float32), np.zeros(8, np.int32), np.zeros(8, bool)
        bb[: len(b)], ll[: len(b)], vv[: len(b)] = b / 128, lab + 1, True
        boxes.append(bb), labels.append(ll), valid.append(vv)
    boxes, labels, valid = map(np.stack, (boxes, labels, valid))

    def positives_per_object(overrides):
        cfg = m2det_jax.load_config("configs/shapes.py", overrides)
        _, conf_t = match(m2det_jax.prior_boxes(cfg), jnp.asarray(boxes), labels, valid,
                          cfg.loss.overlap_thresh)  # fmt: skip
        return float((np.asarray(conf_t) > 0).sum() / valid.sum())

    shipped = positives_per_object([])
    old = positives_per_object(["anchors.size_pattern=(0.08,0.15,0.51,0.87,1.23)",
                                "loss.overlap_thresh=0.5"])  # fmt: skip
    assert 1.0 < old < 2.5 and shipped > 8.0, (old, shipped)
