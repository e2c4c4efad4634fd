"""gpt2onnx: GPT-2 on ONNX Runtime, verified against PyTorch, without PyTorch at run time.

    import gpt2onnx
    model = gpt2onnx.load("out/gpt2")
    print(model.generate("Hello, I'm a language model,", max_new_tokens=30).text)

    from gpt2onnx import pipeline, set_seed   # transformers' pipeline and set_seed, same texts
"""

import importlib

from . import heap

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
    from .loading import load
    from .pipeline import pipeline  # the function, as transformers.pipeline (the module stays gpt2onnx.pipeline's home)
    from .seeding import set_seed
    from .settings import GenerationSettings

__version__ = "0.1.0"

__all__ = ["load", "Model", "Generation", "GenerationSettings", "pipeline", "set_seed", "Gpt2OnnxError",
           "InvalidArgumentError", "ModelLoadError", "ExportError", "VerificationError", "GenerationError",
           "MissingDependencyError", "OutputError", "__version__"]

# imported on first use: model.py and the generation modules it needs are imported by the first load, beside
# its session's initialization (loading.py)
_LATER = {"Model": "model", "Generation": "model"}


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
