"""Typed errors: every failure a user can cause names the thing and the fix."""


class LmtrainError(Exception):
    """Base class for errors caused by user input (config, data, files)."""


class ConfigError(LmtrainError, ValueError):
    """A config key is unknown, has the wrong type, or an impossible value."""


class DataError(LmtrainError, ValueError):
    """Input data is missing, malformed or inconsistent with its manifest."""


class CheckpointError(LmtrainError, RuntimeError):
    """A checkpoint is missing, incomplete or incompatible with the config."""


class DoesNotFit(LmtrainError, RuntimeError):
    """The planner or the compiler finds that a config does not fit in device memory."""


def require(condition: object, message: str) -> None:
    """Raises ``ConfigError(message)`` unless ``condition``: the one line of every config check."""
    if not condition:
        raise ConfigError(message)
