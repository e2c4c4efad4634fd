"""The export step of gpt2onnx (installed as `gpt2onnx_export`): GPT-2 checkpoint -> verified ONNX directory.

Needs the `export` extra (torch, transformers, onnx, safetensors, huggingface-hub): pip install 'gpt2onnx[export]'.
The runtime (`gpt2onnx`) never imports this package.
"""

from gpt2onnx.errors import MissingDependencyError

try:  # fail at import, before any work, when the export extra is missing
    import huggingface_hub  # noqa: F401
    import onnx  # noqa: F401
    import safetensors  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError as _error:
    raise MissingDependencyError(
        f"exporting needs the export extra (cannot import {_error.name or _error})",
        hint="pip install 'gpt2onnx[export]' (installs torch, transformers, onnx, safetensors, huggingface-hub)",
    ) from _error

from .steps import ExportOptions, export_model  # noqa: E402

__all__ = ["ExportOptions", "export_model"]
