"""Floor 1, what an export is: the ONNX contract (names, dtypes, manifest keys), the precisions, GPT-2's facts,
the config, what a graph says of itself and the quantized weights' layouts. Shared with the export side."""
