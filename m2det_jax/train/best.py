"""The best evaluated weights and early stopping (`train.best_metric`,
`train.early_stop_patience`).

After every evaluation of a run (periodic and final) `BestTracker.update` reads the
metric (process 0 computes it; every process gets the same value, so every process takes
the same decision), and when it beats every earlier evaluation (strictly) writes the
evaluated weights (the EMA ones when `train.ema_decay` is on) to `<workdir>/best` as a
params-only checkpoint, which `m2det eval/detect/export --best` (or `--checkpoint
<workdir>/best`) reads. `<workdir>/best.json` keeps the history: the metric, the best step
and value, and every (step, value). Early stopping: once `early_stop_patience`
evaluations in a row did not improve on the best, `should_stop` is True.

Both survive resume: the history is read back and cut at the resumed step (evaluations a
killed run made after its last checkpoint are redone by the resumed one, which trains the
same batches to the same weights), so the best step, the count since it and the decision
to stop are the same as in an uninterrupted run; a run that had stopped early stops again
at once when rerun.
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
from jax.experimental import multihost_utils

from m2det_jax.checkpoints.variables import save_variables
from m2det_jax.evaluation.coco import METRIC_NAMES
from m2det_jax.paths import as_path

_log = logging.getLogger(__name__)

BEST_DIR = "best"
BEST_FILE = "best.json"

def check_metric_name(name: str, metric: str) -> None:
    """A one-line error before training when `train.best_metric` cannot be in the metrics
    of `metric` ("coco" or "voc"); per-class "AP/<name>" is accepted for both."""
    known = METRIC_NAMES if metric == "coco" else ("mAP",)
    if name and name not in known and not name.startswith("AP/"):
        raise ValueError(f"train.best_metric={name!r}: the {metric.upper()} metrics are "
                         f"{', '.join(known)} or AP/<class name>")  # fmt: skip


class BestTracker:
    """See the module docstring. `start_step`: the step the run starts (or resumes) at."""

    def __init__(self, workdir, metric: str, patience: int, start_step: int, cfg,
                 labels=None):  # fmt: skip
        self.workdir, self.metric, self.patience = as_path(workdir), metric, int(patience)
        self.cfg, self.labels = cfg, labels
        self.history: list[list[float]] = []
        path = self.workdir / BEST_FILE
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("metric") == metric:
                self.history = [h for h in old.get("history", []) if h[0] <= start_step]

    @property
    def best(self) -> tuple[int, float] | None:
        """(step, value) of the best evaluation so far (the first of equal ones)."""
        if not self.history:
            return None
        i = int(np.argmax([v for _, v in self.history]))
        return int(self.history[i][0]), float(self.history[i][1])

    @property
    def since_best(self) -> int:
        """Evaluations after the best one."""
        best = self.best
        return 0 if best is None else sum(1 for s, _ in self.history if s > best[0])

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.best is not None and self.since_best >= self.patience

    def update(self, step: int, metrics: dict, variables) -> bool:
        """Records the evaluation at `step` (a collective: every process calls it with its
        `metrics`, which may be empty except on process 0); writes `best/` when it is the
        best so far. Returns whether it was."""
        value = metrics.get(self.metric) if metrics else None
        if jax.process_index() == 0 and metrics and value is None:
            names = ", ".join(k for k, v in metrics.items() if isinstance(v, float))
            raise ValueError(f"train.best_metric={self.metric!r} is not among the evaluation's "
                             f"metrics: {names}")  # fmt: skip
        value = float(np.nan if value is None else value)
        if jax.process_count() > 1:
            value = float(multihost_utils.broadcast_one_to_all(np.float64(value)))
        previous = self.best
        self.history = [h for h in self.history if h[0] < step] + [[int(step), value]]
        improved = previous is None or value > previous[1]
        if improved:
            out = self.workdir / BEST_DIR
            if jax.process_index() == 0 and out.exists():
                out.rmtree()
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("m2det best checkpoint")
            save_variables(out, variables, self.cfg, source=f"best {self.metric} at step {step}",
                           step=int(step), labels=self.labels)  # fmt: skip
        if jax.process_index() == 0:
            best = self.best
            (self.workdir / BEST_FILE).write_text(json.dumps({
                "metric": self.metric, "best_step": best[0], "best_value": best[1],
                "evaluations_since_best": self.since_best, "patience": self.patience,
                "history": self.history}, indent=1))  # fmt: skip
            _log.info("%s %.4f at step %d (best %.4f at step %d%s)", self.metric, value, step,
                      best[1], best[0], f", {self.since_best}/{self.patience} without "
                      "improvement" if self.patience else "")  # fmt: skip
        return improved
