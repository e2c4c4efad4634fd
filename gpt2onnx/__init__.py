"""gpt2onnx: GPT-2 on ONNX Runtime, verified against PyTorch, without PyTorch at run time.

    import gpt2onnx
    model = gpt2onnx.load("out/random-gpt2")
    print(model.generate("Hello, I'm a language model,", max_new_tokens=30).text)

    from gpt2onnx import pipeline, set_seed   # transformers' pipeline and set_seed, same texts

This module is the stable API: `load`, `Model`, `Generation`, `GenerationSettings`, `pipeline`, `set_seed`,
`Engine` (continuous batching) and the errors. The floors below it, lowest first: `format/` (what an export
is), `runtime/` (running the graph), `text/` (tokens and stop rules), `generation/` (the model, sampling,
the engine), `serving/` (HTTP and Ray), `tools/` (the CLI, inspect and plot).
"""

from __future__ import annotations

import importlib

from .runtime import heap

# importing numpy, ONNX Runtime and our modules makes ~100,000 objects that live as long as the process: the
# collector walking them as they are made was a fifth of a cold import (heap.collector_paused)
with heap.collector_paused():
    from .errors import (
        ExportError,
        GenerationError,
        Gpt2OnnxError,
        InvalidArgumentError,
        MissingDependencyError,
        ModelLoadError,
        OutputError,
        VerificationError,
    )
    from .generation.loader import load
    from .generation.pipeline import pipeline  # transformers.pipeline's face
    from .generation.seeding import set_seed
    from .generation.settings import GenerationSettings
    from .version import __version__

__all__ = ["load", "Model", "Generation", "GenerationSettings", "pipeline", "set_seed", "Engine", "EngineOptions",
           "Gpt2OnnxError", "InvalidArgumentError", "ModelLoadError", "ExportError", "VerificationError",
           "GenerationError", "MissingDependencyError", "OutputError", "__version__"]


# imported on first use: the generation modules are imported by the first load, beside its session's
# initialization, and the engine only by those who ask for it
_LATER = {"Model": "generation.model", "Generation": "generation.model", "Engine": "generation.engine",
          "EngineOptions": "generation.engine"}


def __getattr__(name: str):
    module = _LATER.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with heap.collector_paused():
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LATER})
