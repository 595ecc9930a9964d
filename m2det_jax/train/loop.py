"""Training: `train_and_evaluate(cfg, workdir)`, read top to bottom.

Order: run directory -> mesh and data -> model, optimizer and the abstract state
(jax.eval_shape) -> shardings -> restore the latest checkpoint in `workdir`, else init
(optionally from `train.init_checkpoint`) -> jitted train step (donated state) -> loop with
logging, async checkpoints, periodic evaluation, SIGTERM handling and a NaN guard -> final
save and evaluation.

A resumed run continues with the same batches and losses as an uninterrupted one: the
checkpoint holds the train state and the input iterator's position.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from m2det_jax import data
from m2det_jax import distributed as shd
from m2det_jax.checkpoints.fingerprint import config_fingerprint, model_signature
from m2det_jax.checkpoints.training import TrainCheckpoints
from m2det_jax.checkpoints.variables import load_init_variables
from m2det_jax.core.priors import prior_boxes
from m2det_jax.data.device_feed import DevicePrefetch
from m2det_jax.errors import NonFiniteLossError
from m2det_jax.evaluation.driver import evaluate_variables, first_images, metric_of
from m2det_jax.evaluation.pictures import sample_detections
from m2det_jax.models import build_model
from m2det_jax.paths import as_path
from m2det_jax.train.best import BestTracker, check_metric_name
from m2det_jax.train.curves import plot_curves
from m2det_jax.train.data_state import (
    checkpoint_data_state,
    data_counts,
    missing_eval_split,
    restore_data_state,
    tfds_train_data,
)
from m2det_jax.train.meter import describe, meter_for
from m2det_jax.train.optim import learning_rate_schedule, make_optimizer
from m2det_jax.train.preemption import Preemption
from m2det_jax.train.profiling import StepProfiler
from m2det_jax.train.step import TrainState, make_train_step, total_steps
from m2det_jax.train.writers import MetricsLog, write_run_info

_log = logging.getLogger(__name__)


def _stop_if_nonfinite(bad_step: int, ckpts: TrainCheckpoints) -> None:
    """Raises NonFiniteLossError when the device's guard saw a non-finite step (>= 1)."""
    if bad_step < 0:
        return
    ckpts.wait()
    good = ckpts.latest_step()
    raise NonFiniteLossError(
        f"the loss or its gradients were NaN/inf at step {bad_step}; stopped before saving "
        "anything after it (train.skip_nonfinite_steps=True skips such steps). Last good "
        f"checkpoint: {'none' if good is None else f'step {good} in {ckpts.directory}'}")


def _evaluate(evaluate_fn, cfg, state: TrainState, step: int, log: MetricsLog) -> dict:
    metrics = evaluate_fn(cfg, state.eval_variables, step)
    if metrics and jax.process_index() == 0:
        log.write(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                  prefix="eval")  # fmt: skip
        if metrics.get("plots"):
            _log.info("evaluation pictures: %s", ", ".join(metrics["plots"]))
        main = {k: round(metrics[k], 4) for k in ("mAP", "AP", "AP50", "AP75") if k in metrics}
        _log.info(f"eval at step {step}: {main}")
    return metrics


# metrics.jsonl / TensorBoard columns of a train row; device_tflops when XLA counts the
# step's FLOPs, mfu when the device's peak is known (or train.peak_tflops is set).
LOGGED = ("loss", "loc_loss", "conf_loss", "lr", "grad_norm", "images_per_sec", "step_time")


LOGGED_IF_KNOWN = ("device_tflops", "mfu")


def skip_col(m: dict[str, float]) -> dict[str, float]:
    """The skipped_steps column, once a step was skipped (train.skip_nonfinite_steps)."""
    return {"skipped_steps": m["skipped_steps"]} if m.get("skipped_steps", 0) > 0 else {}


def train_and_evaluate(
    cfg,
    workdir: str,
    *,
    train_iterator_fn: Callable[..., Iterator] | None = None,
    num_train_examples: int | None = None,
    evaluate_fn: Callable[[Any, dict, int], dict] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains `cfg` in `workdir`, resuming from its latest checkpoint if there is one.

    Args:
      cfg: the config (see configs/).
      workdir: run directory: checkpoints/, metrics.jsonl, tensorboard/, config.json.
      train_iterator_fn: `(cfg, process_index, process_count) -> iterator` of this
        process's numpy batches (its slice of every global batch) with `get_state()` /
        `set_state()`; default: the TFDS pipeline of `m2det_jax.data` (`tfds_train_data`).
      num_train_examples: dataset size (for epochs); default: from the data module.
      evaluate_fn: `(cfg, variables, step) -> {metric: value}`; default: COCO evaluation
        of `m2det_jax.evaluation` on the eval split, written to the workdir.
      progress: show a progress bar on process 0.

    Returns:
      {"step", "final_metrics", "eval_metrics", "preempted", "state", "early_stopped",
      "best" ((step, value) of train.best_metric, or None)}.
    """
    shd.guard_compilation_cache()
    with Preemption() as preemption:  # from the start: SIGTERM during compile counts too
        # Run directory.
        workdir = as_path(workdir)  # local (made absolute) or a URI such as gs://b/run
        is_main = jax.process_index() == 0
        if is_main:
            workdir.mkdir(parents=True, exist_ok=True)
            write_run_info(workdir, cfg)
        eval_every = cfg.train.eval_every
        builder = None  # the dataset, opened (digests checked, prepared) once for all uses
        if train_iterator_fn is None or (evaluate_fn is None and eval_every >= 0):
            builder = data.open_builder(cfg)
        final_evaluate_fn = evaluate_fn
        default_eval = evaluate_fn is None
        if evaluate_fn is None:
            evaluate_fn = functools.partial(evaluate_variables, workdir=workdir, builder=builder)
            final_evaluate_fn = functools.partial(
                evaluate_variables, workdir=workdir, builder=builder,
                plots_dir=workdir / "plots" if cfg.eval.plots else None)
            missing = None if eval_every < 0 else missing_eval_split(cfg, builder)
            if missing:
                eval_every = -1
                if is_main:
                    _log.info(f"no evaluation: {missing}")
            check_metric_name(cfg.train.best_metric, metric_of(cfg, builder))
        if cfg.train.best_metric and eval_every < 0:
            raise ValueError(f"train.best_metric={cfg.train.best_metric!r} needs evaluations "
                             f"(train.eval_every={eval_every}, or no eval split)")

        # Mesh and data.
        mesh = shd.make_mesh()
        shd.local_batch_size(cfg.train.batch_size, mesh)  # divisible by the devices
        labels = None  # class names + category ids, stored with every checkpoint
        if train_iterator_fn is None:
            train_iterator_fn, num_train_examples = tfds_train_data(cfg, builder)
            labels = data.dataset_labels(builder)
        steps_per_epoch = cfg.train.steps_per_epoch or max(
            num_train_examples // cfg.train.batch_size, 1)
        n_steps = total_steps(cfg, steps_per_epoch)
        data_iter = train_iterator_fn(cfg, jax.process_index(), jax.process_count())

        # Model, optimizer, abstract state and shardings.
        model = build_model(cfg)
        schedule = learning_rate_schedule(cfg, steps_per_epoch)
        tx = make_optimizer(cfg, schedule)
        rng = jax.random.key(cfg.train.seed)
        create = functools.partial(TrainState.create, model, tx, cfg)
        abstract = jax.eval_shape(create, rng)
        state_sharding = jax.tree.map(lambda _: shd.replicated(mesh), abstract)

        # Restore or init.
        ckpts = TrainCheckpoints(workdir / "checkpoints", cfg.train.keep_checkpoints)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, state_sharding)  # fmt: skip
        restored = ckpts.restore_latest(target, cfg)
        if restored is not None:
            latest, state, data_state = restored
            restore_data_state(data_iter, data_state)
            if is_main:
                _log.info(f"resumed from {ckpts.directory} at step {latest}")
        else:
            init_vars = None
            if cfg.train.init_checkpoint:  # `m2det convert` output, full model or backbone
                init_vars, skipped = load_init_variables(cfg.train.init_checkpoint, cfg)
                init_vars = jax.tree.map(np.asarray, init_vars)
                if is_main:
                    _log.info(f"init from {cfg.train.init_checkpoint}"
                          + "".join(f"\n  not loaded: {line}" for line in skipped))
            state = jax.jit(functools.partial(create, init_variables=init_vars),
                            out_shardings=state_sharding)(rng)  # fmt: skip

        # The jitted step.
        step_fn = jax.jit(
            make_train_step(model, tx, schedule, cfg, prior_boxes(cfg)),
            in_shardings=(state_sharding, shd.batch_sharding(mesh)),
            out_shardings=(state_sharding, shd.replicated(mesh)),
            donate_argnums=(0,),
        )
        meta = {"model": model_signature(cfg), "steps_per_epoch": steps_per_epoch,
                "fingerprint": config_fingerprint(cfg)}  # fmt: skip
        if labels:
            meta["labels"] = labels
        # Global batches, data.prefetch ahead: the host pipeline runs during the step.
        ahead = cfg.data.prefetch
        ahead = (0 if jax.default_backend() == "cpu" else 2) if ahead < 0 else ahead
        batches = DevicePrefetch(data_iter, mesh, ahead)

        def save(step: int) -> None:  # never a state past a non-finite step
            _stop_if_nonfinite(int(jax.device_get(state.nonfinite_step)), ckpts)
            ckpts.save(step, state, checkpoint_data_state(batches, data_iter), meta)

        # Best weights and early stopping (train.best_metric / early_stop_patience).
        tracker = None
        if cfg.train.best_metric:
            tracker = BestTracker(workdir, cfg.train.best_metric, cfg.train.early_stop_patience,
                                  int(jax.device_get(state.step)), cfg, labels)  # fmt: skip
        early_stopped = tracker is not None and tracker.should_stop  # rerun of a stopped run
        if early_stopped and is_main:
            _log.info("early stopping: already stopped at step %d (%d evaluations without a "
                      "better %s)", tracker.history[-1][0], tracker.since_best,
                      cfg.train.best_metric)  # fmt: skip

        samples = None  # a few validation images, their detections drawn in TensorBoard
        if default_eval and eval_every >= 0 and is_main and jax.process_count() == 1:
            samples = first_images(builder, cfg.data.eval_split, 4)

        def evaluate_now(step: int, final: bool = False) -> dict:
            m = _evaluate(final_evaluate_fn if final else evaluate_fn, cfg, state, step, log)
            if samples:
                try:  # pictures are never a reason for the run to fail
                    drawn = sample_detections(cfg, jax.device_get(state.eval_variables),
                                              samples, labels and labels["class_names"])
                    log.write_images(step, {f"eval/detections_{i}": im
                                            for i, im in enumerate(drawn)})  # fmt: skip
                except Exception as e:  # noqa: BLE001
                    _log.warning("sample detections not drawn: %s: %s", type(e).__name__, e)
            if tracker is not None:
                tracker.update(step, m, state.eval_variables)
            return m

        # The loop.
        log = MetricsLog(workdir, is_main)
        profiler = StepProfiler(workdir, cfg.train.profile_steps)
        step = start = int(jax.device_get(state.step))
        bar = None
        if progress and is_main:
            bar = tqdm(total=n_steps, initial=start, desc="train", unit="step",
                       dynamic_ncols=True, file=sys.stderr, mininterval=1.0)  # fmt: skip
        last_metrics: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        preempted = False
        compiled, meter = None, None
        try:
            while step < n_steps and not early_stopped:
                if preemption.reached(step):  # the same step on every process
                    preempted = True
                    break
                batch = next(batches)
                if compiled is None:  # compiled once ahead of time: its FLOPs give the MFU
                    compiled = step_fn.lower(state, batch).compile()
                    meter = meter_for(cfg, compiled, jax.devices()[0])
                    if is_main:
                        _log.info(describe(meter, jax.devices()[0]))
                profiler.before(step, state)
                state, metrics = compiled(state, batch)
                step += 1
                meter.tick()
                is_log = step % cfg.train.log_every == 0 or step == n_steps
                is_ckpt = step % cfg.train.checkpoint_every == 0
                if is_log or is_ckpt:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    _stop_if_nonfinite(int(m["nonfinite_step"]), ckpts)
                    m.update(meter.read())
                    last_metrics = m
                    data_stats = data_counts(data_iter)
                    if is_log:
                        log.write(step, {**{k: m[k] for k in LOGGED + LOGGED_IF_KNOWN if k in m},
                                         **skip_col(m), **data_stats})  # fmt: skip
                    if bar is not None:
                        post = {"loss": f"{m['loss']:.3f}", "lr": f"{m['lr']:.2g}",
                                "img_s": f"{m['images_per_sec']:.1f}"}  # fmt: skip
                        if "mfu" in m:
                            post["mfu"] = f"{m['mfu']:.1%}"
                        skipped = data_stats.get("data_bad_images", 0)
                        if skipped:
                            post["bad_img"] = int(skipped)
                        bar.set_postfix(post)
                if bar is not None:
                    bar.update(1)
                if is_ckpt:
                    save(step)
                if eval_every > 0 and step % eval_every == 0 and step < n_steps:
                    _stop_if_nonfinite(int(jax.device_get(state.nonfinite_step)), ckpts)
                    eval_metrics = evaluate_now(step)
                    meter.restart()  # the evaluation is not training throughput
                    if tracker is not None and tracker.should_stop:
                        early_stopped = True
                        if is_main:
                            _log.info("early stopping at step %d: %d evaluations without a "
                                      "better %s (best %.4f at step %d)", step,
                                      tracker.since_best, cfg.train.best_metric,
                                      tracker.best[1], tracker.best[0])  # fmt: skip
        except BaseException:  # stop the reader thread and the async saves, then raise
            profiler.close()
            batches.close()
            ckpts.close()
            log.close()
            raise
        if bar is not None:
            bar.close()
        counts = data_counts(data_iter)  # a collective: on every process
        if is_main and counts:
            _log.info("data: %s", ", ".join(f"{k[5:]} {int(v)}" for k, v in counts.items()))
        profiler.close(state)
        batches.close()

        # Final save and evaluation.
        if ckpts.latest_step() != step:
            save(step)
        ckpts.close()
        if not preempted and eval_every >= 0 and not early_stopped:
            eval_metrics = evaluate_now(step, final=True)
        log.close()
        if is_main and not preempted:
            try:  # a picture of the run; never a reason for the run to fail
                _log.info("training curves: %s", plot_curves(workdir))
            except Exception as e:  # noqa: BLE001
                _log.warning("training curves not drawn: %s: %s", type(e).__name__, e)
        if preempted and is_main:
            _log.info(f"SIGTERM: saved step {step} to {ckpts.directory}; rerun the same command "
                  "to resume")  # fmt: skip
        return {"step": step, "final_metrics": last_metrics, "eval_metrics": eval_metrics,
                "preempted": preempted, "state": state, "early_stopped": early_stopped,
                "best": tracker.best if tracker is not None else None}  # fmt: skip
