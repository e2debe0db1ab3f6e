"""User-facing errors.

Anything the user can fix (a bad file, an unknown key, a missing model) is raised as
``LlmtechError`` with a message that names the file, line or key. The CLI and the lab
runner print the message and exit non-zero without a traceback.
"""


class LlmtechError(Exception):
    """An error caused by input the user controls; its message is shown as-is."""


class DataError(LlmtechError):
    """A data file is malformed, has the wrong schema, or is empty."""


class ConfigError(LlmtechError):
    """A config file or override is invalid."""


class ModelNotAvailable(LlmtechError):
    """A model cannot be resolved or loaded (offline, missing files...)."""


class TrainingDiverged(LlmtechError):
    """The loss became NaN or infinite."""
