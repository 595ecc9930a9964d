"""train.remat (same parameters, loss and gradients; less temp memory) and
train.grad_accum_steps (the whole batch's normaliser, exact sums of microbatch gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2det_jax import build_model, load_config
from m2det_jax.core.priors import prior_boxes
from m2det_jax.models import abstract_variables
from m2det_jax.perf.costs import held_for_backward_bytes
from m2det_jax.train import accumulate
from m2det_jax.train.losses import multibox_loss, multibox_loss_sums
from m2det_jax.train.optim import learning_rate_schedule, make_optimizer
from m2det_jax.train.step import TrainState, device_inputs, make_train_step
from tests.helpers import OVERRIDES, SyntheticIterator, config_path, tiny_variables

BATCH = 8
# Remat recomputes the same ops, but XLA fuses and orders the reductions differently:
# float32 rounding only. Leaves compare with atol = SCALE x the leaf's largest |value|.
RTOL, SCALE = 1e-5, 1e-5


def _cfg(*overrides):
    return load_config(config_path("tiny"), OVERRIDES + list(overrides))


@pytest.fixture(scope="module")
def inputs():
    cfg = _cfg()
    batch = jax.tree.map(jnp.asarray, SyntheticIterator(cfg, BATCH).global_batch(0))
    return batch, device_inputs(cfg, batch, jnp.zeros((), jnp.int32))


@pytest.fixture(scope="module")
def variables():
    return tiny_variables(_cfg())


def _loss_and_grads(cfg, variables, inputs):
    """The plain train step's loss and gradients (BN in training mode)."""
    model, priors = build_model(cfg), jnp.asarray(prior_boxes(cfg))
    images, boxes, labels, valid = inputs

    def loss_fn(params):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                             images, train=True, mutable=["batch_stats"])  # fmt: skip
        loc, conf = multibox_loss(out["loc"], out["logits"], priors, boxes, labels, valid, cfg)
        return loc + conf

    return jax.jit(jax.value_and_grad(loss_fn))(variables["params"])


def _assert_trees_close(got, want, rtol=RTOL, scale=SCALE):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = want
        for key in path:
            w = w[key.key]
        atol = scale * float(np.max(np.abs(w)))
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("backbone", ["resnet18", "vgg16"])
def test_remat_keeps_the_variable_tree(backbone):
    shapes = {
        r: jax.tree.map(lambda a: (a.shape, a.dtype), abstract_variables(
            _cfg(f"train.remat={r}", f"model.backbone={backbone}")))  # fmt: skip
        for r in ("none", "stages", "dots", "full")
    }
    for r in ("stages", "dots", "full"):
        assert jax.tree.structure(shapes[r]) == jax.tree.structure(shapes["none"]), r
        assert shapes[r] == shapes["none"], r


def test_remat_same_loss_and_gradients(inputs, variables):
    loss0, grads0 = _loss_and_grads(_cfg(), variables, inputs[1])
    for remat in ("stages", "full"):
        loss, grads = _loss_and_grads(_cfg(f"train.remat={remat}"), variables, inputs[1])
        np.testing.assert_allclose(loss, loss0, rtol=RTOL, err_msg=remat)
        _assert_trees_close(grads, grads0)


def test_vgg_remat_per_stage_same_loss_and_gradients(inputs):
    vgg = "model.backbone=vgg16"
    variables = tiny_variables(_cfg(vgg))
    loss0, grads0 = _loss_and_grads(_cfg(vgg), variables, inputs[1])
    loss, grads = _loss_and_grads(_cfg(vgg, "train.remat=stages"), variables, inputs[1])
    np.testing.assert_allclose(loss, loss0, rtol=RTOL)
    _assert_trees_close(grads, grads0)


def _step_temp_bytes(cfg, batch):
    model = build_model(cfg)
    schedule = learning_rate_schedule(cfg, 100)
    tx = make_optimizer(cfg, schedule)
    state = jax.eval_shape(lambda r: TrainState.create(model, tx, cfg, r), jax.random.key(0))
    step = make_train_step(model, tx, schedule, cfg, prior_boxes(cfg))
    compiled = jax.jit(step).lower(state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("backbone", ["resnet18", "vgg16"])
def test_remat_holds_less_for_backward(backbone):
    """What the backward pass keeps from the forward (vjp residuals, compiler-independent):
    "stages" keeps block boundaries only, "full" only the inputs and the parameters (at
    this size the parameters are most of it, so activations are compared above "full")."""
    held = {r: held_for_backward_bytes(_cfg(f"train.remat={r}", f"model.backbone={backbone}"),
                                       BATCH)
            for r in ("none", "stages", "dots", "full")}  # fmt: skip
    print(backbone, {k: v // 2**10 for k, v in held.items()}, "KiB")
    act = {k: v - held["full"] for k, v in held.items()}  # above parameters + inputs
    assert 0 < act["stages"] < 0.5 * act["none"]
    assert act["stages"] < act["dots"] < act["none"]


def test_accumulation_reduces_temp_memory(inputs):
    """k microbatches hold 1/k of the activations. (Remat does not lower XLA:CPU's temp
    memory, whose scheduler recomputes early; see the train.remat comment in config.py.)"""
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), inputs[0])
    none = _step_temp_bytes(_cfg(), batch)
    accum = _step_temp_bytes(_cfg("train.grad_accum_steps=4"), batch)
    print(f"temp bytes, tiny at batch {BATCH}: none {none}, accum4 {accum}")
    assert accum < 0.5 * none


def _halves(tree):
    """The two microbatches of k=2: rows 0, 2, 4, ... and 1, 3, 5, ..."""
    return jax.tree.map(lambda x: x[0::2], tree), jax.tree.map(lambda x: x[1::2], tree)


def test_accumulated_step_uses_the_whole_batch_normaliser(inputs, variables):
    cfg = _cfg("train.grad_accum_steps=2")
    model, priors = build_model(cfg), jnp.asarray(prior_boxes(cfg))
    sums_fn = accumulate.multibox_sums_fn(model, cfg, priors, variables["batch_stats"])
    half_grad = jax.jit(jax.grad(sums_fn, has_aux=True))
    parts = [half_grad(variables["params"], h) for h in _halves(inputs[1])]
    n = sum(int(p[1][2]) for p in parts)
    assert n > 0 and all(int(p[1][2]) < n for p in parts)  # both halves have positives
    loc = sum(float(p[1][0]) for p in parts) / n
    conf = sum(float(p[1][1]) for p in parts) / n
    want_grads = jax.tree.map(lambda a, b: (a + b) / n, parts[0][0], parts[1][0])
    want_bs = jax.tree.map(lambda a, b: (a + b) / 2, parts[0][1][3], parts[1][1][3])

    (loss, (loc_l, conf_l, new_bs)), grads = jax.jit(
        lambda p: accumulate.accumulated_value_and_grad(sums_fn, p, inputs[1], 2)
    )(variables["params"])
    np.testing.assert_allclose([loc_l, conf_l, loss], [loc, conf, loc + conf], rtol=1e-6)
    _assert_trees_close(grads, want_grads)
    _assert_trees_close(new_bs, want_bs)

    # The train step itself: same keys, the same loss and gradient norm.
    schedule = learning_rate_schedule(cfg, 100)
    tx = make_optimizer(cfg, schedule)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables["batch_stats"],
                       opt_state=tx.init(variables["params"]))  # fmt: skip
    new_state, metrics = jax.jit(make_train_step(model, tx, schedule, cfg, priors))(
        state, inputs[0]
    )
    assert set(metrics) == {"loss", "loc_loss", "conf_loss", "lr", "grad_norm", "nonfinite_step",
                            "skipped_steps"}
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(want_grads)))
    np.testing.assert_allclose(metrics["loss"], loc + conf, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
    _assert_trees_close(new_state.batch_stats, want_bs)


def test_accumulation_equals_the_full_batch_with_frozen_batchnorm(inputs, variables):
    """With BN on running statistics the forward is per image, so k microbatches must give
    exactly the full-batch `multibox_loss` and its gradients."""
    cfg, k = _cfg(), 4
    model, priors = build_model(cfg), jnp.asarray(prior_boxes(cfg))
    images, boxes, labels, valid = inputs[1]

    def eval_sums(params, micro):
        out = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                          micro[0], False)  # fmt: skip
        loc_s, conf_s, num_pos = multibox_loss_sums(out["loc"], out["logits"], priors,
                                                    *micro[1:], cfg)  # fmt: skip
        return loc_s + conf_s, (loc_s, conf_s, num_pos, variables["batch_stats"])

    def full_loss(params):
        out = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images)
        loc, conf = multibox_loss(out["loc"], out["logits"], priors, boxes, labels, valid, cfg)
        return loc + conf

    loss0, grads0 = jax.jit(jax.value_and_grad(full_loss))(variables["params"])
    (loss, _), grads = jax.jit(
        lambda p: accumulate.accumulated_value_and_grad(eval_sums, p, inputs[1], k)
    )(variables["params"])
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    _assert_trees_close(grads, grads0)


def test_split_order_and_bad_batches():
    x = jnp.arange(8)
    np.testing.assert_array_equal(
        accumulate.split_microbatches(x, 2), [[0, 2, 4, 6], [1, 3, 5, 7]]
    )
    with pytest.raises(ValueError, match=r"train\.grad_accum_steps=3.*batch of 8"):
        accumulate.split_microbatches(x, 3)
    cfg = _cfg("train.grad_accum_steps=3")
    model = build_model(cfg)
    with pytest.raises(ValueError, match=r"train\.grad_accum_steps=3.*per-process batch of 8"):
        make_train_step(model, None, None, cfg, prior_boxes(cfg))


@pytest.mark.parametrize(
    "override, field",
    [("train.grad_accum_steps=0", "train.grad_accum_steps"),
     ("train.grad_accum_steps=-2", "train.grad_accum_steps"),
     ("train.remat=bogus", "train.remat")],
)  # fmt: skip
def test_bad_values_rejected(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        _cfg(override)
