"""Floor 2, running the graph: the ONNX Runtime session and its KV cache, the manifest check, opening a model
directory (ours or Optimum's), the per-user cache, the limits, the CPU and the heap."""
