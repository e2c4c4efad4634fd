"""Looking inside an export: weight names and shapes against the PyTorch state dict, quantized weights and
their dequantization against ONNX Runtime, external data, the `inspect` command."""

import json
import math
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gpt2onnx.errors import InvalidArgumentError
from gpt2onnx.format import contract as c
from gpt2onnx.tools.cli import main
from gpt2onnx.tools.inspection import ModelFile, dequantize_matmul_nbits, inspect_model
from helpers import assert_within_half_a_step, external_data_copy, quantized_copy, rewrite, run_matmul_nbits, run_python


@pytest.fixture(scope="module")
def quantized_export(tiny_export, tmp_path_factory):
    return quantized_copy(tiny_export, tmp_path_factory.mktemp("int4") / "model")


# -- the listing --------------------------------------------------------------------------------------


def test_weights_are_the_pytorch_state_dict(trained_export, trained_reference):
    state = trained_reference[0].state_dict()
    report = inspect_model(trained_export)
    assert [(w.name, w.shape) for w in report.weights] == [(k, tuple(v.shape)) for k, v in state.items()]
    head = next(w for w in report.weights if w.name == "lm_head.weight")
    assert head.tied_to == "transformer.wte.weight" and head.nbytes == 0 and not head.parts
    weights = ModelFile(trained_export)
    for w in report.weights:
        if w.tied_to is None:
            assert w.dtype == "float32" and w.scheme is None and w.nbytes == 4 * math.prod(w.shape), w
        assert np.array_equal(weights.weight(w.name), state[w.name].numpy()), w.name
    assert report.parameters == sum(v.numel() for k, v in state.items() if k != "lm_head.weight")


def test_report_lists_graph_ops_and_manifest(tiny_export):
    report = inspect_model(tiny_export, check_hashes=True)
    graph = onnx.load(str(tiny_export / c.MODEL_FILE)).graph
    assert [v.name for v in report.inputs] == [v.name for v in graph.input]
    assert [v.name for v in report.outputs] == [v.name for v in graph.output] == c.output_names(2)
    assert set(c.input_names(2)) <= {v.name for v in report.inputs}
    assert report.inputs[0].dtype == "int64" and report.inputs[0].shape == (c.DIM_BATCH, c.DIM_SEQUENCE)
    assert report.outputs[1].shape == (c.DIM_BATCH, 4, c.DIM_TOTAL, 16)
    assert report.op_counts == Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                                       for n in graph.node)  # fp32: no If, every node at the top level
    assert report.manifest[c.M_PRECISION] == "fp32" and report.manifest[c.M_PARITY]["passed"]
    assert c.MODEL_FILE in report.manifest["files"]
    assert all(not t.name.startswith("transformer.") for t in report.constants)
    text = report.format()
    assert "lm_head.weight" in text and "tied to transformer.wte.weight (not stored)" in text
    assert "transformer.h.1.mlp.c_fc.weight" in text and "[64, 256]" in text and "parity     passed" in text
    assert json.loads(report.to_json())["weights"][0]["name"] == "transformer.wte.weight"


def test_inspect_command(tiny_export, capsys):
    assert main(["inspect", str(tiny_export), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == json.loads(inspect_model(tiny_export).to_json())
    assert main(["inspect", str(tiny_export)]) == 0
    assert "transformer.wpe.weight" in capsys.readouterr().out
    assert main(["inspect", str(tiny_export.parent / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_external_data_is_read_per_tensor(tiny_export, tmp_path):
    copy = external_data_copy(tiny_export, tmp_path / "external")
    assert (copy / c.MODEL_DATA_FILE).stat().st_size > (copy / c.MODEL_FILE).stat().st_size
    ours, original = inspect_model(copy), inspect_model(tiny_export)
    assert ours.weights == original.weights
    for name in ("transformer.wpe.weight", "transformer.h.1.attn.c_attn.weight", "lm_head.weight"):
        assert np.array_equal(ModelFile(copy).weight(name), ModelFile(tiny_export).weight(name))


def test_unknown_weight_suggests_close_names(tiny_export):
    with pytest.raises(InvalidArgumentError) as error:
        ModelFile(tiny_export).weight("transformer.h.0.attn.c_atn.weight")
    assert "did you mean transformer.h.0.attn.c_attn.weight" in error.value.message
    assert "gpt2onnx inspect" in error.value.hint


# -- quantized weights --------------------------------------------------------------------------------


def test_quantized_export_lists_scheme_and_dequantizes(quantized_export, tiny_export):
    fp32, q = inspect_model(tiny_export), inspect_model(quantized_export)
    shapes = {w.name: w.shape for w in fp32.weights}
    assert {w.name: w.shape for w in q.weights} == shapes  # the same state dict, whatever the storage
    c_attn = next(w for w in q.weights if w.name == "transformer.h.0.attn.c_attn.weight")
    assert c_attn.dtype == "uint8" and c_attn.shape == (64, 192)
    assert c_attn.scheme == "com.microsoft.MatMulNBits accuracy_level=4 bits=4 block_size=32 symmetric"
    assert [p.name for p in c_attn.parts] == list(c.quantized_names(c_attn.name)[:2])
    assert c_attn.parts[0].shape == (192, 2, 16) and c_attn.nbytes == 192 * 2 * 16 + 192 * 2 * 4  # fp32: 49152
    head = next(w for w in q.weights if w.name == "lm_head.weight")
    assert head.tied_to is None and head.scheme.startswith("com.microsoft.MatMulNBits") and head.shape == (50257, 64)
    assert "quantized  bits=4 block_size=32 symmetric=True" in q.format()

    originals, dequantized = ModelFile(tiny_export), ModelFile(quantized_export)
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight", "lm_head.weight"):
        w, d = originals.weight(name), dequantized.weight(name)
        assert d.shape == w.shape and d.dtype == np.float32
        step = np.abs(w).max() / 7  # the largest block scale at 4 bits
        assert np.abs(d - w).max() <= step / 2 + 1e-6, name


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    from helpers import export

    return export("random:tiny", tmp_path_factory.mktemp("int8") / "model", precision="int8", kv_cache="float32")


def test_per_column_int8_lists_scheme_and_dequantizes(int8_export, tiny_export):
    """int8 exports: DynamicQuantizeMatMul with int8 codes [in, out] and a scale per output column."""
    from gpt2onnx.format.per_column import MAX_CODE

    fp32, q = inspect_model(tiny_export), inspect_model(int8_export)
    assert {w.name: w.shape for w in q.weights} == {w.name: w.shape for w in fp32.weights}
    c_attn = next(w for w in q.weights if w.name == "transformer.h.0.attn.c_attn.weight")
    assert (c_attn.dtype, c_attn.shape, c_attn.scheme) == ("int8", (64, 192), "com.microsoft.DynamicQuantizeMatMul "
                                                                               "symmetric")
    assert [(p.name, p.shape) for p in c_attn.parts] == list(zip(c.quantized_names(c_attn.name)[:2],
                                                                 [(64, 192), (192,)]))
    assert c_attn.nbytes == 64 * 192 + 192 * 4
    head = next(w for w in q.weights if w.name == "lm_head.weight")
    assert head.tied_to is None and head.shape == (50257, 64) and head.parts[0].shape == (64, 50257)
    assert f"quantized  scheme=per-column bits=8 symmetric=True max_code={MAX_CODE}" in q.format()

    originals, dequantized = ModelFile(tiny_export), ModelFile(int8_export)
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight", "lm_head.weight"):
        w, d = originals.weight(name), dequantized.weight(name)
        assert d.shape == w.shape and d.dtype == np.float32
        if name == "lm_head.weight":  # the head is [out, in], Conv1D [in, out]
            w, d = w.T, d.T
        assert_within_half_a_step(d, w, name)


def test_int8_exports_of_matmulnbits_still_load_inspect_and_plot(tiny_export, tmp_path):
    """int8 exports made before per-column (MatMulNBits bits=8, a manifest quantization without "scheme")."""
    import gpt2onnx
    from gpt2onnx.format.graph_facts import read_graph_facts
    from gpt2onnx.tools.plot import plot_model

    old = quantized_copy(tiny_export, tmp_path / "old-int8", bits=8, block_size=32)
    assert "scheme" not in json.loads((old / c.MANIFEST_FILE).read_text())[c.M_QUANTIZATION]
    facts = read_graph_facts(old / c.MODEL_FILE)
    assert facts.precision == "int8" and facts.quantization["scheme"] == c.SCHEME_BLOCKS
    assert len(gpt2onnx.load(old).generate("Hello", max_new_tokens=4, ignore_eos=True).token_ids) == 4
    report = inspect_model(old)
    c_attn = next(w for w in report.weights if w.name == "transformer.h.0.attn.c_attn.weight")
    assert c_attn.scheme == "com.microsoft.MatMulNBits accuracy_level=4 bits=8 block_size=32 symmetric"
    w, d = ModelFile(tiny_export).weight(c_attn.name), ModelFile(old).weight(c_attn.name)
    assert np.abs(d - w).max() <= np.abs(w).max() / 127 / 2 + 1e-7
    paths = plot_model(old, tmp_path / "plots", weight=c_attn.name, layers=[0])
    assert paths[2].is_file()


def test_other_dtypes_show_the_node_that_reads_them(tiny_export, tmp_path):
    """A weight stored as float16 and cast by the graph: listed with its dtype and the Cast as its scheme."""
    copy = tmp_path / "fp16"
    shutil.copytree(tiny_export, copy)
    model = onnx.load(str(copy / c.MODEL_FILE))
    name = "transformer.wpe.weight"
    wpe = next(t for t in model.graph.initializer if t.name == name)
    wpe.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(wpe).astype(np.float16), name))
    for node in model.graph.node:
        node.input[:] = ["wpe_f32" if i == name else i for i in node.input]
    model.graph.node.insert(0, helper.make_node("Cast", [name], ["wpe_f32"], to=TensorProto.FLOAT))
    rewrite(copy, model)
    listed = next(w for w in inspect_model(copy).weights if w.name == name)
    assert (listed.dtype, listed.scheme, listed.nbytes) == ("float16", "Cast to=1", 256 * 64 * 2)
    assert listed.shape == (256, 64)
    expected = ModelFile(tiny_export).weight(name).astype(np.float16).astype(np.float32)
    assert np.array_equal(ModelFile(copy).weight(name), expected)


@pytest.mark.parametrize("bits,zero_points", [(bits, zeros) for bits in (2, 4, 8)
                                               for zeros in ("default", "packed", "float")
                                               if (bits, zeros) != (8, "float")])  # not in ONNX Runtime's CPU kernel
def test_dequantize_matches_onnxruntime_kernel(bits, zero_points):
    """ONNX Runtime's own MatMulNBits, multiplying the identity, returns the dequantized matrix: ours must match."""
    rng = np.random.default_rng(bits)
    n, k, block = 24, 80, 32  # K is not a whole number of blocks: the last block is padded
    k_blocks = 3
    packed = rng.integers(0, 256, (n, k_blocks, block * bits // 8), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, (n, k_blocks)).astype(np.float32)
    zeros = {"default": None, "packed": rng.integers(0, 256, (n, -(-k_blocks * bits // 8)), dtype=np.uint8),
             "float": rng.uniform(0, 2 ** bits - 1, (n, k_blocks)).astype(np.float32)}[zero_points]
    ours = dequantize_matmul_nbits(packed, scales, zeros, k=k, n=n, bits=bits, block_size=block)
    theirs = run_matmul_nbits(np.eye(k, dtype=np.float32), packed, scales, zeros, n=n, bits=bits, block_size=block)
    assert np.abs(ours.T - theirs).max() <= 1e-6


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False), (2, False)])
def test_dequantize_matches_onnxruntime_quantizer(bits, symmetric):
    """Quantized by ONNX Runtime's MatMulNBitsQuantizer: ours equals its kernel and is close to the original."""
    pytest.importorskip("onnx_ir", reason="onnxruntime's MatMulNBitsQuantizer needs onnx-ir")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    k, n, block = 80, 24, 32
    w = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)  # MatMul's B: [K, N]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric)
    quantizer.process()
    quantized = quantizer.model.model
    node = next(x for x in quantized.graph.node if x.op_type == "MatMulNBits")
    arrays = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    packed, scales = arrays[node.input[1]], arrays[node.input[2]]
    zeros = arrays[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    assert (zeros is None) == symmetric
    ours = dequantize_matmul_nbits(packed, scales, zeros, k=k, n=n, bits=bits, block_size=block)
    theirs = run_matmul_nbits(np.eye(k, dtype=np.float32), packed, scales, zeros, n=n, bits=bits, block_size=block)
    assert np.abs(ours.T - theirs).max() <= 1e-6
    step = np.abs(w).max() * 2 / (2 ** bits - 1)  # an upper bound on any block's scale
    assert np.abs(ours.T - w).max() <= step


# -- without the plot extra ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["inspect"], ["plot", "--out", "PLOTS"]])
def test_without_plot_extra_says_how_to_install(tiny_export, tmp_path, command):
    argv = [command[0], str(tiny_export)] + [str(tmp_path / "p") if a == "PLOTS" else a for a in command[1:]]
    done = run_python(f"from gpt2onnx.tools.cli import main; sys.exit(main({argv!r}))",
                      blocked=("torch", "transformers", "onnx", "matplotlib"))
    assert done.returncode == 1, done.stderr
    assert "pip install 'gpt2onnx[plot]'" in done.stderr and "Traceback" not in done.stderr
