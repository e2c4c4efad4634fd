"""gpt2onnx: GPT-2 on ONNX Runtime, verified against PyTorch, without PyTorch at run time.

    import gpt2onnx
    model = gpt2onnx.load("out/gpt2")
    print(model.generate("Hello, I'm a language model,", max_new_tokens=30).text)

    from gpt2onnx import pipeline, set_seed   # transformers' pipeline and set_seed, same texts
"""

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
    from .model import Generation, Model, load
    from .pipeline import pipeline  # the function, as transformers.pipeline (the module stays gpt2onnx.pipeline's home)
    from .seeding import set_seed
    from .settings import GenerationSettings

__version__ = "0.1.0"

__all__ = ["load", "Model", "Generation", "GenerationSettings", "pipeline", "set_seed", "Gpt2OnnxError",
           "InvalidArgumentError", "ModelLoadError", "ExportError", "VerificationError", "GenerationError",
           "MissingDependencyError", "OutputError", "__version__"]
