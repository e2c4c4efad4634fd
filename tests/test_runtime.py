"""The runtime: loading with manifest checks, greedy generation with the KV cache, no torch."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import gpt2onnx
from gpt2onnx.errors import InvalidArgumentError, ModelLoadError
from gpt2onnx.format import contract as c
from gpt2onnx.tools.cli import main
from helpers import blocker

BLOCK_TORCH = blocker("torch", "transformers")


def test_runtime_runs_without_torch(tiny_export):
    code = BLOCK_TORCH + f"""
import gpt2onnx
from gpt2onnx.tools.cli import main
model = gpt2onnx.load({str(tiny_export)!r})
result = model.generate("Hello", max_new_tokens=5, ignore_eos=True)
assert len(result.token_ids) == 5
assert main(["generate", "Hello", "--model", {str(tiny_export)!r}, "--max-new-tokens", "3"]) == 0
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx', 'gpt2onnx_export'))
assert loaded == [], loaded
print("TORCH-FREE-OK")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "TORCH-FREE-OK" in done.stdout


def test_export_command_without_extra_says_how_to_install(tmp_path):
    code = BLOCK_TORCH + f"""
from gpt2onnx.tools.cli import main
sys.exit(main(["export", "random:tiny", {str(tmp_path / 'x')!r}]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert "pip install 'gpt2onnx[export]'" in done.stderr and "Traceback" not in done.stderr


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "copy")


def test_tampered_file_fails_hash_check(tiny_export, tmp_path):
    model_dir = _copy(tiny_export, tmp_path)
    data = bytearray((model_dir / c.MODEL_FILE).read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    (model_dir / c.MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="model.onnx does not match the sha256"):
        gpt2onnx.load(model_dir)
    gpt2onnx.load(model_dir, check_hashes=False)  # the explicit opt-out still loads


def test_missing_file_and_unknown_format(tiny_export, tmp_path):
    model_dir = _copy(tiny_export, tmp_path)
    (model_dir / c.TOKENIZER_FILE).unlink()
    with pytest.raises(ModelLoadError, match="lacks tokenizer.json"):
        gpt2onnx.load(model_dir)
    shutil.copyfile(tiny_export / c.TOKENIZER_FILE, model_dir / c.TOKENIZER_FILE)
    manifest = json.loads((model_dir / c.MANIFEST_FILE).read_text())
    manifest[c.M_FORMAT_VERSION] = 99
    (model_dir / c.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="format_version 99"):
        gpt2onnx.load(model_dir)
    with pytest.raises(ModelLoadError, match="does not exist"):
        gpt2onnx.load(tmp_path / "nothing-here")


def test_prompt_beyond_context_is_refused_before_running(tiny_export, monkeypatch):
    model = gpt2onnx.load(tiny_export)
    n = model.config.n_positions  # 256
    prompt = " a" * 250
    assert len(model.tokenizer.encode(prompt)) == 250

    def must_not_run(*args, **kwargs):
        raise AssertionError("the session ran")

    monkeypatch.setattr(model.session, "run", must_not_run)
    with pytest.raises(InvalidArgumentError, match=f"n_positions={n}"):
        model.generate(prompt, max_new_tokens=7)
    monkeypatch.undo()
    assert len(model.generate(prompt, max_new_tokens=6, ignore_eos=True).token_ids) == 6  # 256 fits exactly


def test_cached_greedy_equals_uncached(trained_export):
    """The KV cache is an optimisation only: re-running the whole sequence each step gives the same tokens."""
    model = gpt2onnx.load(trained_export)
    prompt = model.tokenizer.encode("fs.readFile(path")
    cached = model.generate("fs.readFile(path", max_new_tokens=24, ignore_eos=True).token_ids
    ids = list(prompt)
    for _ in range(24):
        n = len(ids)
        logits, _ = model.session.run(np.array([ids]), np.ones((1, n), np.int64), np.arange(n)[None],
                                      model.session.empty_cache(1))
        ids.append(int(logits[0, -1].argmax()))
    assert cached == ids[len(prompt):]


def test_empty_prompt_starts_from_endoftext(trained_export):
    model = gpt2onnx.load(trained_export)
    assert model.encode_prompt("") == [model.eos_token_id]
    assert model.encode_prompt("<|endoftext|>") != [model.eos_token_id]  # typed text is text
    with pytest.raises(InvalidArgumentError, match="prompt must be a string"):
        model.generate(42)


def test_cli_generate_and_errors(tiny_export, capsys, tmp_path):
    assert main(["generate", "Hello", "--model", str(tiny_export), "--max-new-tokens", "4", "--ignore-eos"]) == 0
    expected = gpt2onnx.load(tiny_export).generate("Hello", max_new_tokens=4, ignore_eos=True).text
    assert capsys.readouterr().out == "Hello" + expected + "\n"
    assert main(["generate", "Hello", "--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "hint:" in err and "Traceback" not in err
    assert main(["generate", "Hello", "--model", str(tiny_export), "--max-new-tokens", "-1"]) == 2
    assert "max_new_tokens must be an integer" in capsys.readouterr().err


def test_help_says_where_unset_options_come_from(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    temperature = "--temperature TEMPERATURE divide logits by this before sampling; 0 = greedy (default: the model's)"
    assert temperature in help_text
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: the hub's main branch)" in help_text and "the model's" not in help_text
