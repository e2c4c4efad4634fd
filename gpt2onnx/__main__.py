"""`python -m gpt2onnx` is the `gpt2onnx` command."""

import sys

from .tools.cli import main

sys.exit(main())
