"""The few kinds of error gpt2onnx raises. Each message says what is wrong; the hint says how to fix it."""

from __future__ import annotations


class Gpt2OnnxError(Exception):
    """Base class. `str(error)` is the message followed by a HINT line when there is one."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\nHINT: {hint}")


class InvalidArgumentError(Gpt2OnnxError, ValueError):
    """A parameter has a value that is not allowed (the CLI exits with code 2)."""

    exit_code = 2


class ModelLoadError(Gpt2OnnxError):
    """A model directory is missing, incomplete, tampered with or of an unknown format."""


class MissingDependencyError(Gpt2OnnxError, ImportError):
    """An optional dependency (export, plotting) is not installed."""


class ExportError(Gpt2OnnxError):
    """The export could not be carried out (the source could not be loaded, the output exists, ...)."""


class VerificationError(ExportError):
    """The exported graph disagrees with PyTorch beyond tolerance. `report` holds every comparison."""

    def __init__(self, message: str, *, report: dict, hint: str | None = None):
        self.report = report
        super().__init__(message, hint=hint)


class GenerationError(Gpt2OnnxError):
    """Generation could not go on (for example the model produced non-finite logits)."""


class OutputError(Gpt2OnnxError):
    """A result could not be written (no permission, a full disk, a file where a directory should be)."""
