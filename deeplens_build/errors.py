"""One exception root; every user-facing failure is a subclass with its own exit code.

The CLI prints ``error: <message>`` and exits with ``exit_code``; no traceback, because the message
already names what is wrong and what to do about it.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1
    USAGE = 2
    CONFIG = 3
    SOURCE = 4
    PLUGIN = 5
    PARITY = 6
    BUNDLE = 7
    VERIFY = 8
    SIGNING = 9
    AWS = 10
    DEVICE = 11
    ROLLOUT = 12


class DeepLensBuildError(Exception):
    exit_code: ExitCode = ExitCode.INTERNAL


class UsageError(DeepLensBuildError):
    exit_code = ExitCode.USAGE


class ConfigError(DeepLensBuildError):
    exit_code = ExitCode.CONFIG


class SourceError(DeepLensBuildError):
    """The training output could not be fetched, extracted or read."""

    exit_code = ExitCode.SOURCE


class PluginError(DeepLensBuildError):
    """A plugin is missing, misbehaved, or could not handle the model."""

    exit_code = ExitCode.PLUGIN


class ConversionError(PluginError):
    """Raised by plugins: the model cannot be converted. The core adds the plugin's name."""


class CompileError(PluginError):
    """Raised by target backends: the artifact cannot be compiled for the target. The core adds the backend."""


class ParityError(DeepLensBuildError):
    exit_code = ExitCode.PARITY


class BundleError(DeepLensBuildError):
    exit_code = ExitCode.BUNDLE


class VerificationError(DeepLensBuildError):
    exit_code = ExitCode.VERIFY


class SigningError(DeepLensBuildError):
    exit_code = ExitCode.SIGNING


class AwsError(DeepLensBuildError):
    exit_code = ExitCode.AWS


class RolloutError(DeepLensBuildError):
    """A deployment failed on some devices, or did not finish in time; ``outcome`` holds every device's state."""

    exit_code = ExitCode.ROLLOUT

    def __init__(self, message: str, outcome: object):
        super().__init__(message)
        self.outcome = outcome


class DeviceError(DeepLensBuildError):
    """The local device (``run``, ``watch``) could not do its job: a broker unreachable, a Lambda that died."""

    exit_code = ExitCode.DEVICE


def reworded(exc: DeepLensBuildError, message: str) -> DeepLensBuildError:
    """``exc`` saying ``message`` instead: the same class, exit code and attributes, whatever its constructor
    takes (``type(exc)(message)`` breaks on one that takes more than a message)."""
    new = type(exc).__new__(type(exc))
    new.__dict__.update(exc.__dict__)
    new.args = (message,)
    return new
