"""Reference outputs of the official PyTorch M2Det (m2det320_vgg, seeded weights).

`seeded_weights` regenerates the weights from key names alone; the fixture folder holds
the original's input, priors, outputs and intermediate slices (see its meta.json).
Used by `m2det verify` and by the parity tests.
"""

import json
import os

import numpy as np

from m2det_jax.reference.seeded_weights import seeded_weights

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "m2det320_vgg")


def load_fixture(name: str = "m2det320_vgg") -> dict:
    """keys (list of [key, shape]), input (NHWC float32), priors, loc, conf, intermediates."""
    d = os.path.join(os.path.dirname(__file__), name)
    with open(os.path.join(d, "keys.json")) as f:
        keys = json.load(f)
    with np.load(os.path.join(d, "intermediates.npz")) as z:
        inter = {k: z[k] for k in z.files}
    return {
        "keys": keys,
        "input": np.load(os.path.join(d, "input.npy")).transpose(0, 2, 3, 1),
        "priors": np.load(os.path.join(d, "priors.npy")),
        "loc": np.load(os.path.join(d, "loc.npy")),
        "conf": np.load(os.path.join(d, "conf.npy")),
        "intermediates": inter,
    }


__all__ = ["FIXTURE_DIR", "load_fixture", "seeded_weights"]
