"""The errors m2det-jax raises for bad input or a failed run, in one place.

Each names the file, field or value at fault in its message; the CLI prints that one line.
"""


class ConfigMismatchError(ValueError):
    """A checkpoint was written for a different model config."""


class CheckpointMismatchError(ValueError):
    """A state_dict does not fit the config: names every offending key."""


class BadDataError(ValueError):
    """Too many examples of the dataset cannot be used (see data.max_bad_fraction)."""


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients became NaN or inf; nothing after the last good checkpoint
    was saved."""
