"""The exceptions this library raises for bad input: each names its culprit."""


class LatentDiffusionError(Exception):
    """Base class: the command line prints these as one line and exits non-zero."""


class ConfigError(LatentDiffusionError, ValueError):
    """A bad, unknown or missing configuration key or value."""


class WeightsError(LatentDiffusionError, ValueError):
    """A weights file or model folder that is missing, truncated, foreign or does not fit the model."""


class DataError(LatentDiffusionError, ValueError):
    """A data set that cannot be read as images with captions."""
