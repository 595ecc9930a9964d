"""perf.device_figures: the inputs that make NMS figures interpretable, and the fused
program that feeds them to the NMS behind the real network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2det_jax import load_config
from m2det_jax.core.priors import prior_boxes
from m2det_jax.inference.postprocess import make_detect_fn
from m2det_jax.models import build_model
from m2det_jax.perf import device_figures as figs
from tests.helpers import OVERRIDES, assert_same_detections, config_path


@pytest.fixture(scope="module")
def cfg():
    return load_config(config_path("tiny"), OVERRIDES)


def test_a_detection_shaped_output_has_clusters_of_candidates(cfg):
    loc, logits = figs.detection_shaped(cfg, batch=2, objects=3, seed=1)
    assert loc.shape == (2, prior_boxes(cfg).shape[0], 4) and not loc.any()
    n = figs.nms_candidates(cfg, logits)
    assert 3 <= n < 0.2 * logits.shape[1]  # a few priors per object, not the dense case
    more = figs.nms_candidates(cfg, figs.detection_shaped(cfg, 2, objects=9, seed=1)[1])
    assert more > n


def test_the_dense_case_fills_every_class_up_to_the_cap():
    cfg = load_config(config_path("tiny"), [*OVERRIDES, "postprocess.candidates_per_class=20"])
    loc, logits = figs.dense_worst_case(cfg)
    classes = int(cfg.model.num_classes) - 1
    assert figs.nms_candidates(cfg, logits) == classes * 20
    scores = jax.nn.softmax(jnp.asarray(logits), -1)[..., 1:]
    assert float(scores.max()) < 0.5  # many just above the threshold, none dominant
    uncapped = load_config(config_path("tiny"), [*OVERRIDES, "postprocess.candidates_per_class=0"])
    assert figs.nms_candidates(uncapped, logits) > classes * 20


def test_the_fused_program_feeds_the_nms_the_given_output(cfg):
    """alpha = 0: the detections are those of `detect` on the given (loc, logits) alone,
    though the network ran; alpha = 1 on zeros: those of the network's own output."""
    s = int(cfg.model.input_size)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, s, s, 3), np.uint8))
    variables = jax.jit(build_model(cfg).init)(jax.random.key(0), x.astype(jnp.float32))
    sizes = jnp.full((1, 2), float(s), jnp.float32)
    loc, logits = (jnp.asarray(a) for a in figs.detection_shaped(cfg, 1, objects=4))
    fused = figs.fused_inference_fn(cfg)
    got = fused(variables, x, sizes, jnp.float32(0.0), loc, logits)
    want = jax.jit(make_detect_fn(cfg))(loc, logits, jnp.asarray(prior_boxes(cfg)), sizes)
    assert int(got["valid"].sum()) > 0
    assert_same_detections(got, want)
    net = figs.network_fn(cfg)(variables, x)
    own = fused(variables, x, sizes, jnp.float32(1.0), jnp.zeros_like(loc),
                jnp.zeros_like(logits))  # fmt: skip
    want_own = jax.jit(make_detect_fn(cfg))(net["loc"], net["logits"],
                                            jnp.asarray(prior_boxes(cfg)), sizes)  # fmt: skip
    assert_same_detections(own, want_own)


def test_a_budget_refuses_past_its_time_and_lists_what_it_refused():
    b = figs.Budget(3600)
    assert b.left("first") and b.skipped == []
    b = figs.Budget(0)
    assert not b.left("second") and not b.left("third")
    assert b.skipped == ["second", "third"]
