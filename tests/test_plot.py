"""Attention maps against transformers' `output_attentions`, and the PNGs of `gpt2onnx plot`."""

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from gpt2onnx.errors import InvalidArgumentError
from gpt2onnx.format import contract as c
from gpt2onnx.tools.attention import attention_maps
from gpt2onnx.tools.cli import main
from gpt2onnx.tools.inspection import ModelFile, inspect_model
from gpt2onnx.tools.plot import plot_model
from helpers import blocker, export, external_data_copy, quantized_copy

PROMPTS = ["The cat sat on the mat because it was tired.", "Hello",
           "To open a file in a new window, use the :split command. In Node.js, fs.readFile() reads the whole "
           "file into memory, while fs.createReadStream() returns a stream that emits chunks as they arrive."]


def reference_attentions(model, ids: list[int]) -> np.ndarray:
    """transformers' attention probabilities [n_layer, n_head, tokens, tokens] (eager attention)."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
    return torch.stack(out.attentions)[:, 0].numpy()


def check_against(maps, reference) -> float:
    assert maps.probs.shape == reference.shape and maps.probs.dtype == np.float32
    diff = float(np.abs(maps.probs - reference).max())
    print(f"attention probabilities, {len(maps.token_ids)} tokens: max |ours - transformers| = {diff:.2e}")
    assert diff <= 1e-5
    assert np.abs(maps.probs.sum(axis=-1) - 1).max() <= 1e-5  # every row is a distribution
    assert not np.triu(maps.probs, k=1).any()  # no token sees a later one
    return diff


def eager_from_export(directory):
    """transformers' GPT-2 holding exactly the weights the export lists (strict: every state-dict name)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config.from_pretrained(directory, attn_implementation="eager")).eval()
    weights = ModelFile(directory)
    state = {w.name: torch.from_numpy(weights.weight(w.name)) for w in inspect_model(directory).weights}
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module")
def eager_trained(trained_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(trained_dir, attn_implementation="eager").eval()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_attention_of_trained_model_matches_transformers(trained_export, trained_reference, eager_trained, prompt):
    maps = attention_maps(trained_export, prompt)
    assert maps.token_ids == trained_reference[1](prompt)["input_ids"]
    assert "".join(maps.tokens) == prompt
    check_against(maps, reference_attentions(eager_trained, maps.token_ids))


def test_attention_of_random_tiny_matches_transformers(tiny_export):
    model = eager_from_export(tiny_export)
    for prompt in PROMPTS:
        maps = attention_maps(tiny_export, prompt)
        check_against(maps, reference_attentions(model, maps.token_ids))


def test_attention_scaled_by_inverse_layer_index_matches_transformers(trained_dir, tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_head=2, n_embd=32, n_positions=64, scale_attn_by_inverse_layer_idx=True,
                        attn_implementation="eager")
    source = tmp_path / "source"
    GPT2LMHeadModel(config).save_pretrained(source)
    for name in (c.TOKENIZER_FILE, *c.TOKENIZER_EXTRA_FILES):
        shutil.copy(trained_dir / name, source / name)
    # atol: the export's gate compares with transformers' default (sdpa) attention, which ignores
    # scale_attn_by_inverse_layer_idx (4e-4 from eager on this model); eager, compared below, applies it
    exported = export(str(source), tmp_path / "model", atol=1e-2)
    model = GPT2LMHeadModel.from_pretrained(source, attn_implementation="eager").eval()
    maps = attention_maps(exported, PROMPTS[0])
    check_against(maps, reference_attentions(model, maps.token_ids))


def test_attention_from_external_data_and_quantized_exports(tiny_export, tmp_path):
    fp32 = attention_maps(tiny_export, PROMPTS[0])
    external = attention_maps(external_data_copy(tiny_export, tmp_path / "external"), PROMPTS[0])
    assert np.array_equal(external.probs, fp32.probs)
    quantized = attention_maps(quantized_copy(tiny_export, tmp_path / "int4"), PROMPTS[0])
    assert quantized.probs.shape == fp32.probs.shape
    assert np.abs(quantized.probs.sum(axis=-1) - 1).max() <= 1e-5 and not np.triu(quantized.probs, k=1).any()
    assert np.abs(quantized.probs - fp32.probs).max() < 0.05  # int4 weights move the maps a little


def test_attention_bad_prompt(tiny_export):
    with pytest.raises(InvalidArgumentError, match="non-empty"):
        attention_maps(tiny_export, "")
    with pytest.raises(InvalidArgumentError, match="n_positions=256"):
        attention_maps(tiny_export, "word " * 300)


# -- the PNGs -----------------------------------------------------------------------------------------


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG header; fails if the file is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def check_pngs(paths, expected: dict) -> None:
    from matplotlib.image import imread

    assert {p.name: png_size(p) for p in paths} == expected
    for p in paths:
        width, height = expected[p.name]
        assert imread(p).shape[:2] == (height, width)  # decodes as an image of that size


def test_plot_model_writes_pngs_of_expected_size(tiny_export, tmp_path):
    paths = plot_model(tiny_export, tmp_path / "plots")
    assert all(p.parent == tmp_path / "plots" for p in paths)
    check_pngs(paths, {"positional-embedding.png": (1000, 500), "positional-dims.png": (1000, 400),
                       "weight-transformer.h.0.attn.c_attn.weight.png": (1000, 500),
                       "attention-layer0.png": (1600, 450), "attention-layer1.png": (1600, 450)})


def test_plot_choices(tiny_export, tmp_path):
    paths = plot_model(tiny_export, tmp_path, prompt="Hi", weight="transformer.h.1.ln_1.weight", weight_slice="",
                       dims=[7], positions=256, layers=[1], heads=[0, 2])
    check_pngs(paths, {"positional-embedding.png": (1000, 500), "positional-dims.png": (1000, 400),
                       "weight-transformer.h.1.ln_1.weight.png": (1000, 400), "attention-layer1.png": (800, 450)})
    paths = plot_model(tiny_export, tmp_path, weight="transformer.wpe.weight", weight_slice="5,::2", heads=[3])
    assert png_size(tmp_path / "weight-transformer.wpe.weight.png") == (1000, 400)  # one row: a line
    assert png_size(tmp_path / "attention-layer0.png") == (400, 450)


def test_plot_quantized_weight(tiny_export, tmp_path):
    quantized = quantized_copy(tiny_export, tmp_path / "int4")
    paths = plot_model(quantized, tmp_path / "plots", weight="transformer.h.1.mlp.c_fc.weight", layers=[0])
    assert png_size(paths[2]) == (1000, 500) and paths[2].name == "weight-transformer.h.1.mlp.c_fc.weight.png"


@pytest.mark.parametrize("options,message,hint", [
    (dict(weight="transformer.h.0.attn.c_atn.weight"), "did you mean transformer.h.0.attn.c_attn.weight", "inspect"),
    (dict(weight="transformer.h.9.attn.c_attn.weight"), "no weight named", "state dict"),
    (dict(weight_slice="0:10,0:10,0:10"), "has 3 parts", "shape [64, 192]"),
    (dict(weight_slice="100:200"), "selects nothing", "shape [64, 192]"),
    (dict(weight_slice="a:b"), "not start:stop", "shape [64, 192]"),
    (dict(weight_slice="3,4"), "leaves 0 dimensions", "shape [64, 192]"),
    (dict(layers=[2]), "layer(s) 2 out of range", "layers 0 to 1"),
    (dict(heads=[0, 4]), "head(s) 4 out of range", "heads 0 to 3"),
    (dict(dims=[64]), "dimension(s) 64 out of range", "dimensions 0 to 63"),
    (dict(positions=257), "between 1 and n_positions=256", "256 positions"),
    (dict(prompt=""), "non-empty", "--prompt"),
])
def test_bad_arguments_say_what_is_allowed(tiny_export, tmp_path, options, message, hint):
    with pytest.raises(InvalidArgumentError) as error:
        plot_model(tiny_export, tmp_path / "plots", **options)
    assert message in error.value.message and hint in error.value.hint
    assert not (tmp_path / "plots").exists()  # checked before anything is written


def test_plot_command(tiny_export, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["plot", str(tiny_export), "--out", str(out), "--prompt", "Hello there", "--layers", "0",
                 "--heads", "1", "--dims", "0,5", "--positions", "50", "--weight", "transformer.wpe.weight",
                 "--slice", "0:100"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / name) for name in ("positional-embedding.png", "positional-dims.png",
                                                    "weight-transformer.wpe.weight.png", "attention-layer0.png")]
    assert png_size(out / "attention-layer0.png") == (400, 450)
    assert main(["plot", str(tiny_export), "--out", str(out), "--layers", "5"]) == 2
    assert "out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["plot", str(tiny_export), "--out", str(out), "--dims", "one"])
    assert exit_.value.code == 2


def test_plot_and_inspect_need_no_torch(tiny_export, tmp_path):
    code = blocker("torch", "transformers", "gpt2onnx_export") + f"""
from gpt2onnx.tools.cli import main
assert main(["inspect", {str(tiny_export)!r}, "--json"]) == 0
assert main(["plot", {str(tiny_export)!r}, "--out", {str(tmp_path)!r}, "--layers", "0"]) == 0
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout[:done.stdout.rindex("}") + 1])["config"]["n_layer"] == 2
