import os
import sys

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
