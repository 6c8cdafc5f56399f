"""The framework's own exceptions: every user-facing failure is one of these, with a message that
names the file, row or key at fault and says what to do."""


class CXRError(Exception):
    """Base class of every error cxr-lightning raises on purpose."""


class DataError(CXRError):
    """A dataset file is missing, malformed or inconsistent."""


class ConfigError(CXRError):
    """A configuration value is invalid or inconsistent with the data or checkpoint."""


class CheckpointError(CXRError):
    """A checkpoint is missing, unreadable or does not fit the requested use."""


class TrainingError(CXRError):
    """Training cannot go on: the loss or the weights became NaN/inf."""
