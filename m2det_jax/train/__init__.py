"""Training: `losses` (multibox loss), `optim` (schedule, optimizer), `step` (the jitted
train step; `accumulate` for micro-batches), `data_state` (the input iterator's position
in checkpoints), `writers` / `meter` / `profiling` / `preemption` (what a run writes and
watches), `loop` (`train_and_evaluate`, read top to bottom)."""

from m2det_jax._compat import lazy_exports

_EXPORTS = {
    "train_and_evaluate": "loop",
    "NonFiniteLossError": "loop",
    "TrainState": "step",
    "make_train_step": "step",
    "total_steps": "step",
    "multibox_loss": "losses",
    "learning_rate_schedule": "optim",
    "make_optimizer": "optim",
    "tfds_train_data": "data_state",
    "missing_eval_split": "data_state",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
