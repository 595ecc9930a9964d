import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
sys.path.insert(0, os.path.dirname(__file__))


def config_path(name: str) -> str:
    return os.path.join(CONFIGS, name + ".py")


@pytest.fixture(scope="session")
def fixture320():
    from m2det_jax.reference import load_fixture

    return load_fixture()


def assert_same_detections(got, want, box_atol=1e-4, score_atol=1e-6, keys=("classes",)):
    """Two detection dicts agree: the same valid rows (and `keys`), boxes and scores close
    on them; `want` must hold some detections (else the comparison proves nothing)."""
    m = np.asarray(want["valid"])
    assert m.sum() > 0
    np.testing.assert_array_equal(got["valid"], m)
    for k in keys:
        np.testing.assert_array_equal(got[k], want[k])
    np.testing.assert_allclose(got["boxes"][m], want["boxes"][m], atol=box_atol)
    np.testing.assert_allclose(got["scores"][m], want["scores"][m], atol=score_atol)
