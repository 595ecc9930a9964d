"""Priors: bit-identical to the original's fixture (320) and to a from-the-description
re-derivation (512/704/800); defined for other sizes."""

import itertools
import math

import numpy as np
import pytest

from m2det_jax import load_config, prior_boxes
from m2det_jax.core.priors import SIZE_PATTERNS, STEPS, feature_map_sizes
from tests.helpers import config_path


def _original_priors(size):
    """The original's PriorBox as docs/original.md §2 describes it, in Python doubles."""
    maps, n = [], size
    for _ in range(7):
        n = math.ceil(n / 2)
        maps.append(n)
    maps = maps[2:] + [maps[-1] - 2]
    sp = SIZE_PATTERNS[size]
    mins = [round(sp[k] * size, 2) for k in range(6)]
    maxs = [round(sp[k + 1] * size, 2) for k in range(6)]
    mean = []
    for k, f in enumerate(maps):
        for i, j in itertools.product(range(f), repeat=2):
            f_k = size / STEPS[size][k]
            cx, cy = (j + 0.5) / f_k, (i + 0.5) / f_k
            s = mins[k] / size
            mean += [cx, cy, s, s]
            sp_ = math.sqrt(s * (maxs[k] / size))
            mean += [cx, cy, sp_, sp_]
            for ar in (2, 3):
                mean += [cx, cy, s * math.sqrt(ar), s / math.sqrt(ar)]
                mean += [cx, cy, s / math.sqrt(ar), s * math.sqrt(ar)]
    return np.clip(np.asarray(mean, np.float32).reshape(-1, 4), 0, 1), maps


def test_priors_320_bit_identical_to_original(fixture320):
    got = prior_boxes(load_config(config_path("m2det320_vgg")))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, fixture320["priors"])


@pytest.mark.parametrize(
    "name,count,maps",
    [
        ("m2det320_vgg", 12810, [40, 20, 10, 5, 3, 1]),
        ("m2det512_vgg", 32760, [64, 32, 16, 8, 4, 2]),
        ("m2det704_vgg", 62022, [88, 44, 22, 11, 6, 4]),
        ("m2det800_vgg", 80208, [100, 50, 25, 13, 7, 5]),
        ("m2det320_resnet101", 12810, [40, 20, 10, 5, 3, 1]),
    ],
)
def test_priors_shipped_sizes(name, count, maps):
    cfg = load_config(config_path(name))
    got = prior_boxes(cfg)
    ref, ref_maps = _original_priors(cfg.model.input_size)
    assert feature_map_sizes(cfg) == maps == ref_maps
    assert got.shape == (count, 4)
    np.testing.assert_array_equal(got, ref)


def test_priors_320_asymmetric_step_107():
    got = prior_boxes(load_config(config_path("m2det320_vgg")))
    off = 6 * (40 * 40 + 20 * 20 + 10 * 10 + 5 * 5)
    cx = got[off : off + 9 * 6 : 6, 0][:3]
    np.testing.assert_allclose(cx, [0.1672, 0.5016, 0.8359], atol=1e-4)


@pytest.mark.parametrize("size", [300, 384, 416, 640])
def test_priors_other_sizes(size):
    cfg = load_config(config_path("m2det320_vgg"), [f"model.input_size={size}"])
    maps = feature_map_sizes(cfg)
    pri = prior_boxes(cfg)
    assert pri.shape == (6 * sum(f * f for f in maps), 4)
    assert np.all((pri >= 0) & (pri <= 1))
    # Centres of the first map are evenly spread over the image.
    first = pri[: maps[0] ** 2 * 6 : 6]
    np.testing.assert_allclose(first[: maps[0], 0], (np.arange(maps[0]) + 0.5) / maps[0], atol=1e-6)


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="input_size=64"):
        load_config(config_path("m2det320_vgg"), ["model.input_size=64"])
