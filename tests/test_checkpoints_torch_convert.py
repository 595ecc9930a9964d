"""Converter: exact key naming, strictness (every offender named), shared copies,
backbone-only files, safe .pth reading, and the orbax round trip of `m2det convert`."""

import os
import pickle

import jax
import numpy as np
import pytest

from m2det_jax import build_model, convert_torch_state_dict, load_config
from m2det_jax.checkpoints.torch_convert import key_table, to_torch_state_dict
from m2det_jax.checkpoints.variables import load_variables, merge_variables
from m2det_jax.cli import main as cli_main
from m2det_jax.errors import CheckpointMismatchError, ConfigMismatchError
from m2det_jax.reference import seeded_weights
from tests.helpers import config_path, tiny_variables


def _state_dict_keys(cfg):
    """(key, OIHW shape) of the original's state_dict for `cfg`, via the inverse map."""
    model = build_model(cfg)
    s = cfg.model.input_size
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, s, s, 3))))
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), abstract)
    return [(k, v.shape) for k, v in to_torch_state_dict(zeros, cfg).items()]


def _tiny_sd(overrides=()):
    cfg = load_config(config_path("tiny"), list(overrides))
    return cfg, seeded_weights(_state_dict_keys(cfg))


def test_key_names_equal_original_state_dict(fixture320):
    cfg = load_config(config_path("m2det320_vgg"))
    ours = dict(_state_dict_keys(cfg))
    ref = {k: tuple(s) for k, s in fixture320["keys"]}
    assert set(ours) == set(ref)
    assert all(tuple(ours[k]) == ref[k] for k in ref)


def test_round_trip_and_module_prefix():
    cfg, sd = _tiny_sd()
    v = convert_torch_state_dict(sd, cfg)
    v2 = convert_torch_state_dict({"module." + k: a for k, a in sd.items()}, cfg)
    jax.tree.map(np.testing.assert_array_equal, v, v2)
    back = to_torch_state_dict(v, cfg)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_every_offending_key_is_named():
    cfg, sd = _tiny_sd()
    sd = dict(sd)
    del sd["unet1.layers.0.conv.weight"], sd["conf.2.bias"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["unet2.smooth.0.extra"] = np.zeros(3, np.float32)
    sd["loc.0.weight"] = np.zeros((5, 5, 3, 3), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        convert_torch_state_dict(sd, cfg)
    msg = str(e.value)
    for k in ("unet1.layers.0.conv.weight", "conf.2.bias", "extra.weight",
              "unet2.smooth.0.extra", "loc.0.weight"):  # fmt: skip
        assert k in msg, k
    assert "2 missing" in msg and "2 unknown" in msg and "1 shape mismatch" in msg


def test_checkpoint_of_another_config_is_refused():
    _, sd = _tiny_sd()  # tiny has sfam=True
    cfg = load_config(config_path("tiny"), ["model.sfam=False", "model.num_classes=5"])
    with pytest.raises(CheckpointMismatchError, match="sfam_module.fc1.0.weight") as e:
        convert_torch_state_dict(sd, cfg)
    assert "conf.0.weight" in str(e.value)  # 4 vs 5 classes


def test_shared_copies_must_agree_unless_unshared():
    cfg, sd = _tiny_sd()
    sd = dict(sd)
    sd["leach.1.conv.weight"] = sd["leach.1.conv.weight"] + 1
    with pytest.raises(CheckpointMismatchError, match="(?s)share_ffmv2.*leach.1.conv.weight"):
        convert_torch_state_dict(sd, cfg)
    cfg.model.share_ffmv2 = False
    v = convert_torch_state_dict(sd, cfg)
    np.testing.assert_array_equal(
        v["params"]["ffmv2_1"]["conv"]["conv"]["kernel"],
        sd["leach.1.conv.weight"].transpose(2, 3, 1, 0),
    )


def test_resnet101_full_checkpoint_with_unused_fc():
    cfg = load_config(config_path("m2det320_resnet101"))
    keys = _state_dict_keys(cfg)
    names = {k for k, _ in keys}
    assert {"base.conv1.weight", "base.layer1.0.downsample.0.weight",
            "base.layer3.22.conv3.weight", "base.layer4.2.bn3.running_var"} <= names  # fmt: skip
    keys += [("base.fc.weight", (1000, 2048)), ("base.fc.bias", (1000,))]
    v = convert_torch_state_dict(seeded_weights(keys), cfg)
    n = sum(a.size for a in jax.tree.leaves(v["params"]))
    assert n == 155_173_684


def test_backbone_only_files_merge_into_init():
    cfg = load_config(config_path("tiny"))  # resnet18
    keys = [(k[len("base."):], s) for k, s in _state_dict_keys(cfg) if k.startswith("base.")]
    keys += [("fc.weight", (1000, 512)), ("fc.bias", (1000,))]
    v = convert_torch_state_dict(seeded_weights(keys), cfg)
    assert set(v["params"]) == {"backbone"} and set(v["batch_stats"]) == {"backbone"}
    init = tiny_variables(cfg)  # what training starts from (init's tree), built cheaply
    merged = merge_variables(init, v)
    np.testing.assert_array_equal(merged["params"]["backbone"]["conv1"]["kernel"],
                                  v["params"]["backbone"]["conv1"]["kernel"])  # fmt: skip
    np.testing.assert_array_equal(merged["params"]["tum_0"]["top"]["conv"]["kernel"],
                                  init["params"]["tum_0"]["top"]["conv"]["kernel"])  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match="VGG16 backbone file"):
        convert_torch_state_dict({"0.weight": np.zeros((64, 3, 3, 3))}, cfg)


def test_vgg16_reducedfc_backbone_file():
    cfg = load_config(config_path("m2det320_vgg"))
    table, _ = key_table(cfg)
    keys = [(k[len("base."):], None) for k in table if k.startswith("base.")]
    shapes = dict(_state_dict_keys(cfg))
    sd = seeded_weights([(k, shapes["base." + k]) for k, _ in keys])
    v = convert_torch_state_dict(sd, cfg)
    assert set(v) == {"params"} and set(v["params"]) == {"backbone"}
    assert v["params"]["backbone"]["conv6"]["kernel"].shape == (3, 3, 512, 1024)


@pytest.mark.torch
def test_pth_files_are_read_safely(tmp_path):
    import torch
    cfg, sd = _tiny_sd()
    path = tmp_path / "m.pth"
    torch.save({k: torch.from_numpy(np.asarray(a)) for k, a in sd.items()}, path)
    v = convert_torch_state_dict(str(path), cfg)
    ref = convert_torch_state_dict(sd, cfg)
    jax.tree.map(np.testing.assert_array_equal, v, ref)
    # The official checkpoints predate the zip format (PyTorch 0.4.1): legacy files too,
    # with the leach copies aliasing one tensor as the original saves them.
    tsd = {k: torch.from_numpy(np.asarray(a)) for k, a in sd.items()}
    for lvl in range(1, cfg.model.num_levels):
        for leaf in ("conv.weight", "bn.weight", "bn.bias"):
            tsd[f"leach.{lvl}.{leaf}"] = tsd[f"leach.0.{leaf}"]
    legacy = tmp_path / "legacy.pth"
    torch.save({"module." + k: t for k, t in tsd.items()}, legacy,
               _use_new_zipfile_serialization=False)  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, convert_torch_state_dict(str(legacy), cfg), ref)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Evil()}, bad, pickle_protocol=2)
    with pytest.raises(ValueError, match="refusing to load"):
        convert_torch_state_dict(str(bad), cfg)
    assert not marker.exists()
    # A hand-made pickle of a callable as well (not via torch.save).
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="refusing to load"):
        convert_torch_state_dict(str(raw), cfg)
    assert not marker.exists()


def test_cli_convert_writes_restorable_orbax_checkpoint(tmp_path):
    cfg, sd = _tiny_sd()
    npz = tmp_path / "tiny.npz"
    np.savez(npz, **sd)
    out = tmp_path / "ckpt"
    assert cli_main(["convert", "--config", config_path("tiny"), "--checkpoint", str(npz),
                     "--output", str(out)]) == 0  # fmt: skip
    assert os.path.isdir(out)
    restored = load_variables(out, cfg)
    ref = convert_torch_state_dict(sd, cfg)
    jax.tree.map(np.testing.assert_array_equal, restored, ref)
    other = load_config(config_path("tiny"), ["model.num_classes=7", "model.planes=32"])
    with pytest.raises(ConfigMismatchError, match="model.num_classes: checkpoint 4, config 7"):
        load_variables(out, other)
    # Same shapes, other outputs: refused, every field named, unless explicitly allowed.
    moved = load_config(config_path("tiny"), ["anchors.variance=(0.1,0.25)",
                                              "preprocess.pixel_means=(1.0,2.0,3.0)"])  # fmt: skip
    with pytest.raises(ConfigMismatchError,
                       match=r"(?s)anchors.variance: checkpoint \[0.1, 0.2\], config \[0.1, "
                             r"0.25\].*preprocess.pixel_means"):  # fmt: skip
        load_variables(out, moved)
    jax.tree.map(np.testing.assert_array_equal,
                 load_variables(out, moved, allow_config_mismatch=True), ref)  # fmt: skip
    with pytest.raises(SystemExit, match="anchors.variance"):
        cli_main(["eval", "--config", config_path("tiny"), "--checkpoint", str(out),
                  "--config.anchors.variance=(0.1,0.25)", "--workdir", str(tmp_path / "e")])  # fmt: skip


def test_cli_convert_reports_bad_file(tmp_path, capsys):
    with pytest.raises(SystemExit, match="checkpoint not found"):
        cli_main(["convert", "--config", config_path("tiny"), "--checkpoint",
                  str(tmp_path / "missing.pth"), "--output", str(tmp_path / "o")])  # fmt: skip
