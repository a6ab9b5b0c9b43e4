"""The exceptions this library raises on purpose: each names its culprit.

LatentDiffusionError             the command line prints it as one line (`ldm: error: ...`) without a traceback
  UserInputError (ValueError)    bad input from the user: exit code 2
    ArgumentError                a bad argument to a public function or command-line option
    ConfigError                  a bad, unknown or missing configuration key or value
    WeightsError                 a weights file or model folder that cannot be used
    DataError                    a data set that cannot be read as images with captions
  (others, e.g. a loss that became NaN: the run itself failed, exit code 1)

Anything else (a TypeError, a RuntimeError from torch, a plain ValueError of an internal check) is a bug or an
environment problem and keeps its traceback; `ldm --debug` shows the traceback of these one-line errors too.
The user-input errors are ValueErrors, so `except ValueError` keeps catching them.
"""


class LatentDiffusionError(Exception):
    """Base class: the command line prints these as one line and exits non-zero."""


class UserInputError(LatentDiffusionError, ValueError):
    """Input the user gave (arguments, config, files, data) cannot be used; the message names it."""


class ArgumentError(UserInputError):
    """A bad argument to a public function, method or command-line option."""


class ConfigError(UserInputError):
    """A bad, unknown or missing configuration key or value."""


class WeightsError(UserInputError):
    """A weights file or model folder that is missing, truncated, foreign or does not fit the model."""


class DataError(UserInputError):
    """A data set that cannot be read as images with captions."""
