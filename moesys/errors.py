"""The error type of bad settings and bad input, shared by the config, the data and the entry point.

`moesys-train` prints a ConfigError as one line (`moesys-train: error: <message>`) and exits with
code 2, with no traceback (trainer.debug=true shows it). The message names the setting and the
value, e.g. `trainer.batch_size must be > 0, got 0`.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A setting, or the input a setting names (data file, output directory), is not usable."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """A file a setting names does not exist (both a ConfigError and a FileNotFoundError)."""
