"""Helpers the test modules share (fixtures live in conftest.py; test modules never import each other).

    export(spec, out, **options)          an export, quietly (ExportOptions keywords)
    run_python(code, blocked=(...))       `code` in a fresh interpreter where importing `blocked` fails
    rewrite(directory, model)             save an edited graph into an export, manifest hashes updated
    external_data_copy(src, dst)          an export rewritten with its weights in model.onnx.data
    quantized_copy(src, dst, bits, block_size)   an fp32 export rewritten with MatMulNBits, as another
                                          exporter could write it (packed here, independently of ours)
    run_matmul_nbits(x, packed, scales, zeros, n, bits, block_size)   ONNX Runtime's MatMulNBits on x
    run_dynamic_quantize_matmul(x, codes, scales)   ONNX Runtime's DynamicQuantizeMatMul on x
    assert_within_half_a_step(dequantized, weight, name)   per-column int8 weights [in, out] within half a step
    transformers_generate(model, tokenizer, prompts, seed, options, max_new_tokens)   set_seed + generate, padded
    torch_logprobs(reference, ids)        torch's log_softmax of transformers' logits at every position
    run_cli(capsys, *argv)                `gpt2onnx ARGV` in this process: (exit code, stdout, stderr), no traceback
    one_error(err, progress=False)        the CLI's one-line error (its hint line after it); nothing else on stderr
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# The trained test model ships with the tests (float16 weights, configs, held-out text; tests/data/.../TRAINING.md).
TRAINED_DATA = REPO / "tests" / "data" / "gpt2-tiny-trained"
TRAINED_FILES = ("model.safetensors", "config.json", "generation_config.json", "TRAINING.md", "heldout.txt")


def export(spec: str, out: Path, **options) -> Path:
    from gpt2onnx_export import ExportOptions, export_model

    export_model(spec, out, ExportOptions(**options), progress=lambda message: None)
    return out


def blocker(*modules: str) -> str:
    """Python source that makes importing any of `modules` (and their submodules) fail, as if not installed."""
    return f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {tuple(modules)!r}:
            raise ImportError('blocked: ' + name, name=name)
sys.meta_path.insert(0, Block())
"""


def run_python(code: str, *, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (with `blocked` modules made unimportable); text output captured."""
    return subprocess.run([sys.executable, "-c", (blocker(*blocked) if blocked else "") + code],
                          capture_output=True, text=True)


# -- exports rewritten the way another exporter could have written them ----------------------------


def rewrite(directory, model, *, external: bool = False, **manifest_updates) -> None:
    """Save `model` into `directory` and bring its manifest's file list and hashes up to date."""
    import onnx

    from gpt2onnx.format import contract as c
    from gpt2onnx.runtime.manifest import hash_files, write_manifest

    onnx.save_model(model, str(directory / c.MODEL_FILE), save_as_external_data=external,
                    location=c.MODEL_DATA_FILE, size_threshold=1024)
    manifest = json.loads((directory / c.MANIFEST_FILE).read_text())
    names = set(manifest[c.M_FILES]) | ({c.MODEL_DATA_FILE} if external else set())
    manifest.update(manifest_updates, **{c.M_FILES: hash_files(directory, sorted(names))})
    write_manifest(directory, manifest)


def external_data_copy(src, dst):
    """The export with its weights in model.onnx.data, as large models are saved."""
    import onnx

    from gpt2onnx.format import contract as c

    shutil.copytree(src, dst)
    rewrite(dst, onnx.load(str(dst / c.MODEL_FILE)), external=True)
    return dst


def pack_symmetric(w: np.ndarray, *, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """W [N, K] -> MatMulNBits codes [N, k_blocks, block_size * bits / 8] and scales [N, k_blocks]."""
    n, k = w.shape
    k_blocks = -(-k // block_size)
    blocks = np.pad(w, ((0, 0), (0, k_blocks * block_size - k))).reshape(n, k_blocks, block_size)
    half = 2 ** (bits - 1)
    scales = (np.abs(blocks).max(axis=2) / (half - 1)).astype(np.float32)
    codes = np.clip(np.rint(blocks / scales[..., None]) + half, 0, 2 * half - 1).astype(np.uint8)
    per_byte = 8 // bits
    codes = codes.reshape(n, k_blocks, block_size // per_byte, per_byte)
    packed = sum(codes[..., j] << (bits * j) for j in range(per_byte)).astype(np.uint8)
    return packed, scales


def quantized_copy(src, dst, *, bits: int = 4, block_size: int = 32):
    """The export with every block matmul and the head as MatMulNBits, named as the contract says: what an
    int4 export looks like (wte stays float32 for its Gather; the tied head becomes its own copy)."""
    import onnx
    from onnx import helper, numpy_helper

    from gpt2onnx.format import contract as c

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / c.MODEL_FILE))
    weights = {t.name: t for t in model.graph.initializer}
    nodes, replaced = [], set()
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:  # Conv1D: x @ W, W [in, out]
            name, w = node.input[1], numpy_helper.to_array(weights[node.input[1]]).T
            replaced.add(name)
        elif node.op_type == "Gemm":  # the tied head: x @ wte^T
            name, w = "lm_head.weight", numpy_helper.to_array(weights[node.input[1]])
        else:
            nodes.append(node)
            continue
        packed, scales = pack_symmetric(w, bits=bits, block_size=block_size)
        codes_name, scales_name, _ = c.quantized_names(name)
        model.graph.initializer.extend([numpy_helper.from_array(packed, codes_name),
                                        numpy_helper.from_array(scales, scales_name)])
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], codes_name, scales_name], list(node.output),
                                      domain="com.microsoft", K=w.shape[1], N=w.shape[0], bits=bits,
                                      block_size=block_size, accuracy_level=4))
    kept = [t for t in model.graph.initializer if t.name not in replaced]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    rewrite(dst, model, **{c.M_PRECISION: f"int{bits}", c.M_QUANTIZATION: {"bits": bits, "block_size": block_size,
                                                                             "symmetric": True, "accuracy_level": 4}})
    return dst


def run_matmul_nbits(x: np.ndarray, packed, scales, zeros, *, n: int, bits: int, block_size: int) -> np.ndarray:
    """ONNX Runtime's MatMulNBits (one node, CPU) on x [rows, K] with a packed weight W [N, K]: x @ W.T, [rows, N].
    `zeros` None: symmetric (no zero-point input)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rows, k = x.shape
    tensors = [("b", packed), ("s", scales)] + ([("z", zeros)] if zeros is not None else [])
    node = helper.make_node("MatMulNBits", ["x"] + [name for name, _ in tensors], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block_size)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
                              initializer=[numpy_helper.from_array(a, name) for name, a in tensors])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def assert_within_half_a_step(dequantized: np.ndarray, weight: np.ndarray, name: str = "") -> None:
    """Per-column int8 (DynamicQuantizeMatMul): every dequantized weight [in, out] is within half a step of the
    original, the step of an output column being max |column| / MAX_CODE (float32 rounding allowed for)."""
    from gpt2onnx.format.per_column import MAX_CODE

    step = np.abs(weight).max(axis=0) / MAX_CODE
    assert (np.abs(dequantized - weight) <= step / 2 * (1 + 1e-5) + 1e-7).all(), name


def run_dynamic_quantize_matmul(x: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """ONNX Runtime's DynamicQuantizeMatMul (one node, CPU) on x [rows, K] with int8 codes [K, N] and a scale per
    column [N]: [rows, N]."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("DynamicQuantizeMatMul", ["x", "b", "s"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(codes, "b"), numpy_helper.from_array(scales, "s")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


# -- the CLI's errors ---------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`gpt2onnx ARGV` in this process: (exit code, stdout, stderr); fails on a traceback."""
    from gpt2onnx.tools.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def one_error(err: str, *, progress: bool = False) -> str:
    """The error line of the CLI's one-line error, followed by its hint line; fails on anything else on stderr
    (progress: an export's progress lines, `[   0.3s] building ...`, may come before them; nothing else)."""
    lines = err.strip("\n").splitlines()
    assert "Traceback" not in err, err
    assert len(lines) >= 2 and (progress or len(lines) == 2), err
    assert all(re.match(r"\[ *\d+\.\ds\] \S", line) for line in lines[:-2]), err
    assert lines[-2].startswith("gpt2onnx: error: ") and lines[-1].startswith("hint: "), err
    return lines[-2]


# -- PyTorch's side of a comparison -----------------------------------------------------------------


def transformers_generate(model, tokenizer, prompts, seed, options, max_new_tokens):
    """transformers' new token ids after set_seed(seed), prompts left-padded, each row cut after its EOS."""
    import torch
    from transformers import set_seed

    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    set_seed(seed)
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=True, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.eos_token_id, **options)
    rows = out[:, batch["input_ids"].shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def torch_logprobs(reference, ids: list[int]) -> np.ndarray:
    """torch.log_softmax (float32) of transformers' logits at every position of one unpadded sequence;
    reference: (GPT2LMHeadModel, tokenizer)."""
    import torch

    model, _ = reference
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits, dim=-1).numpy()


def openai_client(base_url: str, *, asynchronous: bool = False, **options):
    """The official `openai` client against one of our servers (no key checked, no retries unless asked)."""
    import openai

    kind = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return kind(**{"base_url": base_url + "/v1", "api_key": "unused", "max_retries": 0, **options})
