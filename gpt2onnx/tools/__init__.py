"""Floor 6, the tools: the `gpt2onnx` command line and its plugins, inspect, plot and attention maps."""
