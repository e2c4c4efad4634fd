"""The export step: contract, verification gate, atomic publishing, sources.

(kill -9 and SIGTERM during an export: tests/test_hardening_export.py.)"""

import json
import shutil

import onnx
import pytest

import gpt2onnx
from gpt2onnx.errors import ExportError, InvalidArgumentError, VerificationError
from gpt2onnx.format import contract as c
from gpt2onnx.runtime.manifest import sha256_file
from helpers import export


def test_tiny_export_has_contract_and_manifest(tiny_export):
    manifest = json.loads((tiny_export / c.MANIFEST_FILE).read_text())
    assert manifest[c.M_FORMAT] == c.FORMAT_NAME and manifest[c.M_FORMAT_VERSION] == c.FORMAT_VERSION
    assert manifest[c.M_PRECISION] == "fp32" and manifest[c.M_OPSET] == c.OPSET
    assert manifest[c.M_SOURCE] == {"kind": "random", "architecture": "tiny", "seed": 0}
    assert {"onnxruntime", "torch", "transformers", "onnx"} <= set(manifest[c.M_VERSIONS])
    files = set(manifest[c.M_FILES])
    assert {c.MODEL_FILE, c.CONFIG_FILE, c.GENERATION_CONFIG_FILE, c.TOKENIZER_FILE} <= files
    for name, digest in manifest[c.M_FILES].items():
        assert sha256_file(tiny_export / name) == digest
    parity = manifest[c.M_PARITY]
    assert parity["passed"] and parity["greedy"]["equal"] and parity["greedy"]["tokens"] == 32
    assert max(parity["max_abs_diff"].values()) <= 1e-4
    # every output is reported, and every prompt length the issue names (n_positions - 1 = 255 here)
    assert set(parity["max_abs_diff"]) == set(c.output_names(2))
    assert {ch["check"] for ch in parity["checks"]} >= {"prefill[1]", "prefill[7]", "prefill[128]", "prefill[255]",
                                                        "decode[past=7]", "decode[past=128]", "padded_batch[3,9]"}

    model = onnx.load(str(tiny_export / c.MODEL_FILE), load_external_data=False)
    assert [i.name for i in model.graph.input] == c.input_names(2)
    assert [o.name for o in model.graph.output] == c.output_names(2)
    weights = {t.name for t in model.graph.initializer if t.name.startswith(("transformer.", "lm_head"))}
    assert "lm_head.weight" not in weights and "transformer.wte.weight" in weights  # tied weight stored once
    assert "transformer.h.1.mlp.c_proj.weight" in weights
    assert not list(tiny_export.parent.glob(".*partial*"))  # nothing left behind


def test_trained_model_greedy_equals_transformers(trained_export, trained_reference):
    import torch

    model, tokenizer = trained_reference
    ours = gpt2onnx.load(trained_export)
    for prompt in ["The :substitute command", "fs.readFile(path", "Hello, I'm a language model,", "In Vim, to"]:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=False, max_new_tokens=48, pad_token_id=tokenizer.eos_token_id)
        expected = out[0, ids["input_ids"].shape[1]:].tolist()
        got = ours.generate(prompt, max_new_tokens=48)
        assert got.token_ids == expected, prompt
        assert got.text == tokenizer.decode(expected)


def test_gate_catches_corrupted_weight(tmp_path, monkeypatch):
    from gpt2onnx_export import builder

    real_save = builder.save_model

    def save_with_a_damaged_weight(model, weights, config, directory):
        damaged = dict(weights)
        damaged["transformer.h.1.mlp.c_fc.bias"] = weights["transformer.h.1.mlp.c_fc.bias"] + 1e-2
        return real_save(model, damaged, config, directory)

    monkeypatch.setattr(builder, "save_model", save_with_a_damaged_weight)
    with pytest.raises(VerificationError) as info:
        export("random:tiny", tmp_path / "out")
    report = info.value.report
    assert not report["passed"] and "logits" in report["failed_outputs"]
    assert report["max_abs_diff"]["logits"] > 1e-4
    # layer 0's cache does not depend on the damaged layer-1 weight, so it still matches
    assert report["max_abs_diff"]["present.0.key"] <= 1e-4
    assert "logits" in str(info.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_gate_catches_corrupted_graph(tmp_path, monkeypatch):
    from gpt2onnx_export import builder

    monkeypatch.setattr(builder, "_MASK_VALUE", 0.0)  # the causal mask no longer hides future tokens
    with pytest.raises(VerificationError) as info:
        export("random:tiny", tmp_path / "out")
    checks = {ch["check"]: ch for ch in info.value.report["checks"] if ch["output"] == c.LOGITS}
    assert checks["prefill[1]"]["passed"]  # one token has no future to leak
    assert not checks["prefill[7]"]["passed"]
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tiny_export, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_export, out)
    before = (out / c.MANIFEST_FILE).read_text()
    with pytest.raises(ExportError, match="already exists"):
        export("random:tiny", out, seed=1)
    assert (out / c.MANIFEST_FILE).read_text() == before
    export("random:tiny", out, seed=1, force=True)
    assert json.loads((out / c.MANIFEST_FILE).read_text())[c.M_SOURCE]["seed"] == 1
    gpt2onnx.load(out)

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a gpt2onnx export"):
        export("random:tiny", precious, force=True)
    assert (precious / "notes.txt").read_text() == "mine"


def test_interrupted_export_cleans_up(tmp_path, monkeypatch):
    from gpt2onnx_export import verify

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify, "verify", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export("random:tiny", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_local_directory_sources(tiny_export, tmp_path):
    """A Hugging Face directory with a pickle checkpoint and only vocab.json + merges.txt."""
    import torch
    from safetensors import safe_open  # noqa: F401  (export extra present)

    from gpt2onnx.format.config import ModelConfig
    from gpt2onnx_export.reference import torch_model
    from gpt2onnx_export.sources import random_weights

    src = tmp_path / "checkpoint"
    src.mkdir()
    config = json.loads((tiny_export / c.CONFIG_FILE).read_text())
    (src / "config.json").write_text(json.dumps(config))
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tiny_export / name, src / name)
    weights = random_weights(ModelConfig.from_dict(config), seed=3)
    state = {k: torch.from_numpy(v).clone() for k, v in weights.items()}
    state = {k.removeprefix("transformer."): v for k, v in state.items()}  # the old checkpoints' key style
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ExportError, match="pickle"):
        export(str(src), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    out = export(str(src), tmp_path / "accepted", allow_pickle=True)
    model = gpt2onnx.load(out)
    assert model.tokenizer.encode("Hello world") == [15496, 995]
    reference = torch_model(config, weights)
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([[15496, 995]]), do_sample=False, max_new_tokens=8,
                                      pad_token_id=50256)[0, 2:].tolist()
    assert model.generate("Hello world", max_new_tokens=8).token_ids == expected


def test_bad_sources_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(InvalidArgumentError, match="random:NAME with NAME one of"):
        export("random:gpt5", tmp_path / "a")
    with pytest.raises(ExportError, match="does not exist"):
        export("./no/such/dir", tmp_path / "b")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        export(str(empty), tmp_path / "c")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="cannot download 'gpt2-medium' from the Hugging Face Hub"):
        export("gpt2-medium", tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.heavy
def test_random_gpt2_export_verifies(tmp_path):
    out = export("random:gpt2", tmp_path / "gpt2")
    parity = json.loads((out / c.MANIFEST_FILE).read_text())[c.M_PARITY]
    assert parity["passed"] and max(parity["max_abs_diff"].values()) <= 1e-4
    assert {ch["check"] for ch in parity["checks"]} >= {"prefill[1023]", "decode[past=128]"}
    model = gpt2onnx.load(out)
    assert len(model.generate("Hello, I'm a language model,", max_new_tokens=16, ignore_eos=True).token_ids) == 16
