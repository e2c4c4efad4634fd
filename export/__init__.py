"""The export step of gpt2onnx (installed as `gpt2onnx_export`): GPT-2 checkpoint -> verified ONNX directory.

Needs the `export` extra (torch, transformers, onnx, safetensors, huggingface-hub): pip install 'gpt2onnx[export]'.
The runtime (`gpt2onnx`) never imports this package; it contributes the `export`, `verify` and `bench`
commands to the `gpt2onnx` CLI through the entry-point group `gpt2onnx.commands` (see commands.py).

Importing the package itself is cheap (the CLI loads commands.py to list those commands): the extra is
imported, or its absence reported with how to install it, when ExportOptions or export_model is first used.
"""

from __future__ import annotations

import importlib
import importlib.util

from gpt2onnx.errors import MissingDependencyError

EXTRA = ("huggingface_hub", "onnx", "safetensors", "torch", "transformers")  # what the export extra installs
INSTALL_HINT = "pip install 'gpt2onnx[export]' (installs torch, transformers, onnx, safetensors, huggingface-hub)"

__all__ = ["ExportOptions", "export_model", "require_extra", "missing_extra"]


def missing_extra() -> str | None:
    """The first module of the export extra that is not installed, found without importing any; None if all are."""
    for name in EXTRA:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


def require_extra() -> None:
    """Import the export extra, or raise MissingDependencyError saying how to install it (before any work)."""
    try:
        for name in EXTRA:
            importlib.import_module(name)
    except ImportError as error:
        raise MissingDependencyError(f"exporting needs the export extra (cannot import {error.name or error})",
                                     hint=INSTALL_HINT) from error


def __getattr__(name: str):
    if name in ("ExportOptions", "export_model"):
        require_extra()
        from . import steps

        return getattr(steps, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
