"""The project's error types: a :class:`UserError` is a problem with the user's input (a flag, a
file, a checkpoint) whose message names it and says what to do. The CLIs print it as one
``error:`` line and exit 2 (:func:`megatron_yuyuan.cli.run_cli`); anything else is a bug and keeps
its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input; the message names the file or flag and what to do."""


class ConfigError(UserError):
    """A configuration that cannot run; the message names the field and what to do."""


class DataError(UserError):
    """A dataset file that is missing, truncated, inconsistent or does not fit the model."""


class TrainingError(UserError):
    """A run that must stop (e.g. a NaN/Inf loss): continuing would train on garbage."""


class ConversionError(UserError):
    """Weights that do not fit the GPT-2 name table or the model's config."""
