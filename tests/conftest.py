import os
from pathlib import Path

import pytest

from helpers import export

TRAINED = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "gpt2-tiny-trained"
if not TRAINED.is_dir():  # CI lays shared/ beside the clone; allow an override
    TRAINED = Path(os.environ.get("GPT2ONNX_TRAINED_MODEL", TRAINED))


@pytest.fixture(scope="session")
def trained_dir() -> Path:
    if not (TRAINED / "config.json").is_file():
        pytest.fail(f"the trained test model is missing at {TRAINED} (set GPT2ONNX_TRAINED_MODEL)")
    return TRAINED


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    return export("random:tiny", tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory, trained_dir) -> Path:
    return export(str(trained_dir), tmp_path_factory.mktemp("trained") / "model")


@pytest.fixture(scope="session")
def trained_reference(trained_dir):
    """transformers' own model and tokenizer, loaded the ordinary way (not through our export code)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(trained_dir).eval(), AutoTokenizer.from_pretrained(trained_dir)
