"""Checkpoints: `variables` (model weights: save/load, class names), `training` (a run's
state + input position, async), `fingerprint` (the config fields a checkpoint must agree
on), `torch_convert` (official PyTorch state_dicts in and out)."""

from m2det_jax._compat import lazy_exports

_EXPORTS = {
    "ConfigMismatchError": "fingerprint",
    "config_fingerprint": "fingerprint",
    "check_fingerprint": "fingerprint",
    "model_signature": "fingerprint",
    "check_signature": "fingerprint",
    "save_variables": "variables",
    "load_variables": "variables",
    "load_init_variables": "variables",
    "merge_variables": "variables",
    "read_labels": "variables",
    "read_meta": "variables",
    "TrainCheckpoints": "training",
    "CheckpointMismatchError": "torch_convert",
    "convert_torch_state_dict": "torch_convert",
    "load_state_dict_file": "torch_convert",
    "to_torch_state_dict": "torch_convert",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
