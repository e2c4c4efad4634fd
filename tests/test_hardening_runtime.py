"""Hardening of the runtime: an export is judged by its graph, not by what its manifest claims; every bad
input is one error line and a hint (exit 2 for arguments, 1 for a damaged model or environment), never a
traceback; one call cannot ask for unbounded threads, rows or memory."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import gpt2onnx
from gpt2onnx.errors import GenerationError, InvalidArgumentError, ModelLoadError
from gpt2onnx.format import contract as c
from gpt2onnx.format.graph_facts import read_graph_facts
from gpt2onnx.generation.settings import GenerationSettings
from gpt2onnx.runtime import limits
from gpt2onnx.runtime.manifest import hash_files, write_manifest
from helpers import export, one_error, run_cli, run_python

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory):
    return export("random:tiny", tmp_path_factory.mktemp("int4") / "model", precision="int4", block_size=32)


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    return export("random:tiny", tmp_path_factory.mktemp("int8") / "model", precision="int8")


def copy_of(src, tmp_path, name="copy") -> Path:
    return Path(shutil.copytree(src, tmp_path / name))


def edit_manifest(directory: Path, rehash: bool = True, **changes) -> dict:
    """Change manifest keys (a value None removes the key) and, as a tamperer would, re-hash every listed file."""
    manifest = json.loads((directory / c.MANIFEST_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    if rehash:
        manifest[c.M_FILES] = hash_files(directory, sorted(manifest[c.M_FILES]))
    write_manifest(directory, manifest)
    return manifest


# -- 1. the manifest's claims are checked against the graph ------------------------------------------


def facts_by_onnx(path: Path) -> dict:
    """The same facts read with the onnx package: an independent reading of the protobuf."""
    model = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type in ("MatMulNBits", "DynamicQuantizeMatMul")]
    codes = {t.name: t.data_type for t in model.graph.initializer}
    schemes = {("blocks", a["bits"], a["block_size"], len(n.input) < 4 or not n.input[3], a.get("accuracy_level", 0))
               if n.op_type == "MatMulNBits" else
               ("per-column", 8 * onnx.helper.tensor_dtype_to_np_dtype(codes[n.input[1]]).itemsize, None,
                len(n.input) < 4 or not n.input[3], None)
               for n in nodes for a in [{x.name: helper.get_attribute_value(x) for x in n.attribute}]}
    past = next(i for i in model.graph.input if i.name == c.past_key(0))
    locations = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    return {"nodes": len(nodes), "schemes": schemes, "past": onnx.helper.tensor_dtype_to_np_dtype(
        past.type.tensor_type.elem_type).name, "locations": locations}


def test_graph_facts_agree_with_the_onnx_package(tiny_export, int4_export, int8_export, tmp_path):
    external = copy_of(tiny_export, tmp_path, "external")
    onnx.save_model(onnx.load(str(external / c.MODEL_FILE)), str(external / c.MODEL_FILE), save_as_external_data=True,
                    location=c.MODEL_DATA_FILE, size_threshold=1024)
    for directory, precision in ((tiny_export, "fp32"), (int4_export, "int4"), (int8_export, "int8"),
                                 (external, "fp32")):
        ours, theirs = read_graph_facts(directory / c.MODEL_FILE), facts_by_onnx(directory / c.MODEL_FILE)
        assert ours.precision == precision and ours.quantized_matmuls == theirs["nodes"]
        q = ours.quantization
        keys = ("scheme", "bits", "block_size", "symmetric", "accuracy_level")
        schemes = {tuple(q.get(k) for k in keys)} if q else set()
        assert schemes == theirs["schemes"]
        assert ours.kv_cache == theirs["past"] and set(ours.external_files) == theirs["locations"]
        manifest = json.loads((directory / c.MANIFEST_FILE).read_text())
        claimed = manifest.get(c.M_QUANTIZATION)
        assert (q is None) == (claimed is None) and (q is None or q.items() <= claimed.items())
        assert ours.kv_cache == manifest[c.M_KV_CACHE]["dtype"]
    assert read_graph_facts(int4_export / c.MODEL_FILE).quantization["block_size"] == 32
    assert read_graph_facts(external / c.MODEL_FILE).external_files == (c.MODEL_DATA_FILE,)


def test_fp32_graph_under_an_int4_manifest_is_refused(tiny_export, tmp_path, capsys):
    lying = copy_of(tiny_export, tmp_path)
    edit_manifest(lying, **{c.M_PRECISION: "int4",
                            c.M_QUANTIZATION: {"bits": 4, "block_size": 32, "symmetric": False, "accuracy_level": 4}})
    message = "manifest says precision int4 but the graph is fp32"
    with pytest.raises(ModelLoadError, match=message):
        gpt2onnx.load(lying)
    with pytest.raises(ModelLoadError, match=message):
        gpt2onnx.load(lying, check_hashes=False)  # claims are checked even without hashes
    for argv in (["generate", "Hello", "-m", lying], ["inspect", lying], ["inspect", lying, "--no-check-hashes"],
                 ["plot", lying, "--out", tmp_path / "plots"], ["verify", lying]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 1 and message in one_error(err), argv
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("changes,message", [
    ({c.M_PRECISION: "fp32", c.M_QUANTIZATION: None}, "manifest says precision fp32 but the graph is int4"),
    ({c.M_QUANTIZATION: {"bits": 4, "block_size": 128, "symmetric": False, "accuracy_level": 4}},
     "block_size differ"),
    ({c.M_QUANTIZATION: None}, "gives no quantization entry"),
    ({c.M_KV_CACHE: {"dtype": "float32"}}, "manifest says kv_cache float32 but the graph's cache inputs are int8"),
    ({c.M_PRECISION: "int8"}, "manifest says precision int8 but the graph is int4"),
], ids=["int4-as-fp32", "block-size", "no-quantization", "kv-cache", "int4-as-int8"])
def test_quantized_graph_claims(int4_export, tmp_path, changes, message):
    lying = copy_of(int4_export, tmp_path)
    edit_manifest(lying, **changes)
    with pytest.raises(ModelLoadError, match=message):
        gpt2onnx.load(lying)


def test_per_column_graph_under_a_blocks_manifest_is_refused(int8_export, tmp_path):
    lying = copy_of(int8_export, tmp_path)
    edit_manifest(lying, **{c.M_QUANTIZATION: {"bits": 8, "block_size": 128, "symmetric": True, "accuracy_level": 4}})
    with pytest.raises(ModelLoadError, match="scheme differ"):
        gpt2onnx.load(lying)


def test_fp32_manifest_with_a_quantization_entry_is_refused(tiny_export, tmp_path):
    lying = copy_of(tiny_export, tmp_path)
    edit_manifest(lying, **{c.M_QUANTIZATION: {"bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 4}})
    with pytest.raises(ModelLoadError, match="gives a quantization .* but the graph is fp32"):
        gpt2onnx.load(lying)


def test_external_weights_must_be_hashed(tiny_export, tmp_path):
    external = copy_of(tiny_export, tmp_path)
    onnx.save_model(onnx.load(str(external / c.MODEL_FILE)), str(external / c.MODEL_FILE), save_as_external_data=True,
                    location="weights.bin", size_threshold=1024)
    manifest = edit_manifest(external)  # model.onnx re-hashed, weights.bin not listed
    assert "weights.bin" not in manifest[c.M_FILES]
    with pytest.raises(ModelLoadError, match="reads weights from 'weights.bin', which the manifest does not list"):
        gpt2onnx.load(external)
    edit_manifest(external, **{c.M_FILES: {**manifest[c.M_FILES], "weights.bin": "0" * 64}})
    assert gpt2onnx.load(external).generate("Hi", max_new_tokens=2, ignore_eos=True).token_ids == \
        gpt2onnx.load(tiny_export).generate("Hi", max_new_tokens=2, ignore_eos=True).token_ids


@pytest.mark.parametrize("name", ["../../x", "/etc/hostname", "..", ".", "", "sub/config.json", "a\\b", "nul\0byte"])
def test_manifest_file_names_must_be_plain(tiny_export, tmp_path, capsys, name):
    bad = copy_of(tiny_export, tmp_path)
    manifest = edit_manifest(bad)
    manifest[c.M_FILES][name] = "0" * 64
    write_manifest(bad, manifest)
    with pytest.raises(ModelLoadError, match="which is not a plain file name"):
        gpt2onnx.load(bad)
    code, _, err = run_cli(capsys, "generate", "Hi", "-m", bad)
    assert code == 1 and "not a plain file name" in one_error(err)


def test_manifest_file_may_not_lead_outside(tiny_export, tmp_path):
    bad = copy_of(tiny_export, tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the model")
    (bad / "notes.txt").symlink_to(outside)
    manifest = edit_manifest(bad)
    manifest[c.M_FILES]["notes.txt"] = hash_files(tmp_path, ["outside.txt"])["outside.txt"]
    write_manifest(bad, manifest)
    with pytest.raises(ModelLoadError, match="leads outside its model directory"):
        gpt2onnx.load(bad)


@pytest.mark.parametrize("damage,message", [
    ("sha", "is not 64 hex digits"),
    ("unlisted config", "does not list config.json"),
    ("unlisted generation config", "does not list generation_config.json"),
    ("config not json", "config.json is not valid JSON"),
    ("config not utf-8", "config.json is not valid JSON"),
    ("config a list", "config.json holds a JSON list"),
    ("config n_head", "n_head"),
    ("config n_layer 0", "n_layer must be"),
    ("generation config not json", "generation_config.json is not valid JSON"),
    ("generation config temperature", "generation_config.json is invalid: temperature must be"),
    ("task params max_length", "task_specific_params\\['text-generation'\\] is invalid: max_length must be"),
    ("eos out of range", "eos_token_id 999999 .* is not a token of this model"),
    ("model truncated", "model.onnx is not a valid ONNX file"),
    ("model empty", "model.onnx is empty"),
    ("manifest not json", "manifest.json is not valid JSON"),
])
def test_damaged_model_directory_is_one_line_exit_1(tiny_export, tmp_path, capsys, damage, message):
    """Damage re-hashed into the manifest (as a tamperer would) is caught after the hash check."""
    bad = copy_of(tiny_export, tmp_path)
    config = json.loads((bad / c.CONFIG_FILE).read_text())
    rehash = True
    if damage == "sha":
        manifest = json.loads((bad / c.MANIFEST_FILE).read_text())
        manifest[c.M_FILES][c.CONFIG_FILE] = "not-a-hash"
        write_manifest(bad, manifest)
        rehash = False
    elif damage.startswith("unlisted"):
        name = c.CONFIG_FILE if damage == "unlisted config" else c.GENERATION_CONFIG_FILE
        manifest = json.loads((bad / c.MANIFEST_FILE).read_text())
        del manifest[c.M_FILES][name]
        write_manifest(bad, manifest)
        rehash = False
    elif damage == "config not json":
        (bad / c.CONFIG_FILE).write_text('{"n_layer": 2,')
    elif damage == "config not utf-8":
        (bad / c.CONFIG_FILE).write_bytes(b'{"n_layer": "\xff"}')
    elif damage == "config a list":
        (bad / c.CONFIG_FILE).write_text("[1, 2]")
    elif damage == "config n_head":
        (bad / c.CONFIG_FILE).write_text(json.dumps({**config, "n_head": "four"}))
    elif damage == "config n_layer 0":
        (bad / c.CONFIG_FILE).write_text(json.dumps({**config, "n_layer": 0}))
    elif damage == "generation config not json":
        (bad / c.GENERATION_CONFIG_FILE).write_text("{'single': 'quotes'}")
    elif damage == "generation config temperature":
        (bad / c.GENERATION_CONFIG_FILE).write_text(json.dumps({"temperature": -1}))
    elif damage == "task params max_length":
        (bad / c.CONFIG_FILE).write_text(json.dumps({**config, "task_specific_params": {
            "text-generation": {"max_length": "fifty"}}}))
    elif damage == "eos out of range":
        (bad / c.GENERATION_CONFIG_FILE).write_text(json.dumps({"eos_token_id": 999999}))
    elif damage == "model truncated":
        data = (bad / c.MODEL_FILE).read_bytes()
        (bad / c.MODEL_FILE).write_bytes(data[:len(data) // 2])
    elif damage == "model empty":
        (bad / c.MODEL_FILE).write_bytes(b"")
    elif damage == "manifest not json":
        (bad / c.MANIFEST_FILE).write_text("{")
        rehash = False
    if rehash:
        edit_manifest(bad)
    with pytest.raises(ModelLoadError, match=message):
        gpt2onnx.load(bad)
    # inspect lists weights: it reads neither generation_config.json nor the generation defaults
    lists = not damage.startswith(("generation config", "task params", "eos"))
    for argv in (["generate", "Hello", "-m", bad, "--max-new-tokens", "2"], *([["inspect", bad]] if lists else [])):
        code, out, err = run_cli(capsys, *argv)
        assert code == 1 and out == "" and len(err.strip().split("\n")) <= 2, err
        assert err.startswith("gpt2onnx: error: ")


def test_a_file_given_as_the_model_directory(tiny_export, capsys):
    code, _, err = run_cli(capsys, "generate", "Hello", "-m", tiny_export / c.CONFIG_FILE)
    assert code == 1 and "config.json is a file, not a model directory" in one_error(err)
    code, _, err = run_cli(capsys, "inspect", tiny_export / c.MODEL_FILE)
    assert code == 1 and "is a file, not a model directory" in one_error(err)


# -- 2. tracebacks become one-line errors ----------------------------------------------------------


def _cli_process(argv, *, stdin: bytes = b"", env: dict | None = None) -> subprocess.CompletedProcess:
    paths = [str(ROOT), str(ROOT / ".shim"), os.environ.get("PYTHONPATH", "")]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    full_env.pop("PYTHONUTF8", None)
    full_env.pop("PYTHONIOENCODING", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "gpt2onnx", *map(str, argv)], input=stdin,
                          capture_output=True, env=full_env, check=False)


@pytest.mark.parametrize("locale", ["C.UTF-8", "en_US.UTF-8", "C"])
def test_invalid_utf8_on_stdin(tiny_export, locale):
    done = _cli_process(["generate", "-", "-m", tiny_export, "--max-new-tokens", "2"], stdin=b"Hello \xff there",
                        env={"LC_ALL": locale, "LANG": locale})
    err = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in err and done.stdout == b""
    assert "stdin is not valid UTF-8: byte 0xff at offset 6" in one_error(err)


def test_utf8_stdin_under_any_locale(tiny_export, tiny):
    prompt = "naïve café\r\n"
    expected = tiny.generate("naïve café\n", max_new_tokens=3, ignore_eos=True).text
    for locale in ("C", "C.UTF-8"):
        done = _cli_process(["generate", "-", "-m", tiny_export, "--max-new-tokens", "3", "--ignore-eos", "--json"],
                            stdin=prompt.encode(), env={"LC_ALL": locale})
        assert done.returncode == 0, done.stderr.decode()
        assert json.loads(done.stdout)[0]["text"] == expected


def test_an_output_encoding_that_cannot_write_the_text(tiny_export):
    """A terminal (or PYTHONIOENCODING) whose encoding lacks a character of the text: one line saying which, exit 1
    (the environment), the text printed so far kept."""
    for encoding, argv in (("ascii", []), ("latin-1", ["--stream"])):
        done = _cli_process(["generate", "naïve 日本", "-m", tiny_export, "--max-new-tokens", "2", *argv],
                            env={"PYTHONIOENCODING": encoding})
        err = done.stderr.decode()
        assert done.returncode == 1, err
        assert "the output's encoding" in one_error(err) and "cannot write the text" in one_error(err)
        assert "PYTHONIOENCODING=utf-8" in err


def test_out_of_memory_is_one_line(tiny_export, capsys, monkeypatch):
    import gpt2onnx.generation.loader

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(gpt2onnx.generation.loader, "load", no_memory)
    code, _, err = run_cli(capsys, "generate", "Hello", "-m", tiny_export)
    assert code == 1 and one_error(err) == "gpt2onnx: error: out of memory"


def test_plot_output_errors(tiny_export, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a_file = tmp_path / "a-file.png"
    a_file.write_bytes(b"x")
    code, out, err = run_cli(capsys, "plot", tiny_export, "--out", a_file, "--layers", "0")
    assert code == 2 and out == "" and "is an existing file, not a directory" in one_error(err)
    assert a_file.read_bytes() == b"x"
    code, out, err = run_cli(capsys, "plot", tiny_export, "--out", a_file / "sub", "--layers", "0")
    assert code == 1 and out == "" and "cannot write" in one_error(err) and "Not a directory" in err


# -- 3. --stream checks everything before printing -------------------------------------------------


@pytest.mark.parametrize("bad", [["--temperature", "-1", "--do-sample"], ["--max-new-tokens", "300"],
                                 ["-n", "2", "--do-sample"], ["--top-p", "0", "--do-sample"], ["--threads", "100000"],
                                 ["--json"]])
def test_stream_prints_nothing_when_refused(tiny_export, capsys, bad):
    code, out, err = run_cli(capsys, "generate", "Hello there", "-m", tiny_export, "--stream", *bad)
    assert code == 2 and out == "", out
    one_error(err)


def test_stream_checks_when_called(tiny, monkeypatch):
    monkeypatch.setattr(tiny.session, "run", lambda *a, **k: pytest.fail("the session ran"))
    with pytest.raises(InvalidArgumentError, match="top_k"):
        tiny.stream("Hello", top_k=-1)  # no iteration needed
    with pytest.raises(InvalidArgumentError, match="n_positions"):
        tiny.stream(" a" * 250, max_new_tokens=20)


# -- 4. every argument error has a hint ------------------------------------------------------------

# the documented bound, worked out here rather than by gpt2onnx.runtime.limits: 4 ONNX Runtime threads per CPU this
# process may run on
MAX_THREADS = 4 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
CLI_BAD = [
    (["--max-new-tokens", "-1"], "max_new_tokens must be an integer from 0"),
    (["--max-new-tokens", "2000000"], "max_new_tokens must be an integer from 0 to 1000000"),
    (["--max-new-tokens", "300"], "n_positions=256"),
    (["--max-length", "0"], "max_length must be an integer >= 1"),
    (["--max-length", "-5"], "max_length must be an integer >= 1"),
    (["--max-length", "2"], "max_length=2 counts the prompt"),
    (["--min-new-tokens", "-1"], "min_new_tokens must be an integer"),
    (["--temperature", "-1", "--do-sample"], "temperature must be 0 (greedy) or a number from 1e-30 to 1e+30"),
    (["--temperature", "nan", "--do-sample"], "temperature must be 0 (greedy) or a number from 1e-30 to 1e+30, "
                                              "got nan"),
    (["--temperature", "inf", "--do-sample"], "temperature must be 0 (greedy) or a number from 1e-30 to 1e+30, "
                                              "got inf"),
    (["--top-k", "-1"], "top_k must be an integer >= 0"),
    (["--top-p", "0", "--do-sample"], "top_p must be a number in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be a number in (0, 1]"),
    (["--top-p", "nan"], "top_p must be a number in (0, 1], got nan"),
    (["--repetition-penalty", "0"], "repetition_penalty must be a number from 1e-30 to 1e+30"),
    (["--repetition-penalty", "-2"], "repetition_penalty must be a number from 1e-30 to 1e+30"),
    (["--repetition-penalty", "inf"], "repetition_penalty must be a number from 1e-30 to 1e+30 (1 means "
                                      "none), got inf"),
    (["--no-repeat-ngram-size", "-1"], "no_repeat_ngram_size must be an integer >= 0"),
    (["-n", "0", "--do-sample"], "num_return_sequences must be an integer from 1 to 64"),
    (["-n", "65", "--do-sample"], "num_return_sequences must be an integer from 1 to 64"),
    (["-n", "3"], "num_return_sequences=3 with greedy decoding"),
    (["--seed", "-1", "--do-sample"], "seed must be an integer from 0 to 4294967295"),
    (["--seed", str(2**32), "--do-sample"], "seed must be an integer from 0 to 4294967295"),
    (["--stop", ""], "stop must be a list of non-empty strings"),
    (["--threads", "-1"], "threads must be an integer from 0 to"),
    (["--threads", "1000"], f"threads must be an integer from 0 to {MAX_THREADS}"),
    (["--stream", "--json"], "--stream and --json do not go together"),
    (["--stream", "-n", "2", "--do-sample"], "num_return_sequences must be 1"),
]


@pytest.mark.parametrize("options,message", CLI_BAD, ids=[" ".join(o) for o, _ in CLI_BAD])
def test_bad_generate_options_are_one_error_and_a_hint(tiny_export, capsys, options, message):
    code, out, err = run_cli(capsys, "generate", "Hello there", "-m", tiny_export, *options)
    assert code == 2 and out == ""
    assert message in one_error(err)


PY_BAD = [
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(max_new_tokens=np.bool_(True)), "max_new_tokens must be an integer"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an integer"),
    (dict(max_new_tokens="5"), "max_new_tokens must be an integer"),
    (dict(max_length=True), "max_length must be an integer"),
    (dict(top_k=np.float32(3)), "top_k must be an integer"),
    (dict(seed=np.uint64(2**63), do_sample=True), "seed must be an integer from 0"),
    (dict(temperature=np.float32("nan"), do_sample=True), "temperature must be 0 "),
    (dict(temperature=True, do_sample=True), "temperature must be 0 "),
    (dict(temperature=10**400, do_sample=True), "temperature must be 0 "),
    (dict(top_p="0.9"), "top_p must be a number"),
    (dict(do_sample=1), "do_sample must be True or False"),
    (dict(ignore_eos="yes"), "ignore_eos must be True or False"),
    (dict(return_full_text=1), "return_full_text must be True or False"),
    (dict(allow_special_tokens="no"), "allow_special_tokens must be True or False"),
    (dict(sampler=["torch"]), "sampler must be one of"),
    (dict(truncate=["left"]), "truncate must be None or 'left'"),
    (dict(stop=[1]), "stop must be a list of non-empty strings"),
]


@pytest.mark.parametrize("options,message", PY_BAD, ids=[repr(o) for o, _ in PY_BAD])
def test_bad_python_options_name_the_parameter_with_a_hint(tiny, options, message):
    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(")) as error:
        tiny.generate("Hello there", **options)
    assert error.value.hint, error.value.message


def test_every_argument_error_in_the_runtime_has_a_hint():
    """Every `raise InvalidArgumentError(...)` in these modules passes a hint (the README promises one)."""
    missing = []
    for module in ("generation/settings", "generation/model", "runtime/session", "generation/defaults",
                   "runtime/limits", "tools/plot", "tools/cli"):
        path = ROOT / "gpt2onnx" / f"{module}.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                    and getattr(node.exc.func, "id", None) == "InvalidArgumentError"
                    and not any(k.arg == "hint" for k in node.exc.keywords)):
                missing.append(f"{path.name}:{node.lineno}")
    assert missing == []
    for field in ("max_new_tokens", "min_new_tokens", "top_k", "no_repeat_ngram_size", "num_return_sequences", "seed",
                  "do_sample", "ignore_eos", "temperature", "top_p", "repetition_penalty", "stop", "sampler"):
        with pytest.raises(InvalidArgumentError) as error:
            GenerationSettings(**{field: "bad"})
        assert error.value.hint and field in error.value.message


# -- 5. the model's faults are exit 1; a bad step is named -----------------------------------------


def test_onnx_runtime_failure_is_the_model_s_fault(tiny_export, capsys, monkeypatch):
    import onnxruntime as ort

    def fail(self, binding):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
                           "Gather node")

    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", fail)
    with pytest.raises(GenerationError, match="ONNX Runtime failed to run a step of model.onnx"):
        gpt2onnx.load(tiny_export).generate("Hello", max_new_tokens=2)
    code, out, err = run_cli(capsys, "generate", "Hello", "-m", tiny_export, "--max-new-tokens", "2")
    assert code == 1 and out == "" and "ONNX Runtime failed" in one_error(err)


def test_session_checks_a_step_against_the_contract(tiny):
    session = tiny.session
    ids = np.array([[1, 2, 3]])
    ok = (ids, np.ones((1, 3), np.int64), np.arange(3)[None])
    assert session.run(*ok, session.empty_cache(1))[0].shape == (1, 3, 50257)
    bad_steps = [
        ((ids, np.ones((1, 4), np.int64), np.arange(3)[None], session.empty_cache(1)), "attention_mask"),
        ((ids, np.ones((1, 3), np.int64), np.arange(2)[None], session.empty_cache(1)), "position_ids"),
        ((ids, np.ones((1, 3), np.int64), np.arange(3)[None], session.empty_cache(2)), "cache of 2 rows"),
        ((ids.astype(np.float32), *ok[1:], session.empty_cache(1)), "integer arrays"),
        ((ids[:, :0], np.ones((1, 0), np.int64), np.arange(0)[None], session.empty_cache(1)), "step needs"),
        ((np.array([[1, 50257, 3]]), *ok[1:], session.empty_cache(1)), "token ids from 0 to 50256"),
        ((np.array([[-1, 2, 3]]), *ok[1:], session.empty_cache(1)), "token ids from 0 to 50256"),
        ((np.zeros((1, 257), np.int64), np.ones((1, 257), np.int64), np.arange(257)[None], session.empty_cache(1)),
         "n_positions=256"),
    ]
    for args, message in bad_steps:
        with pytest.raises(InvalidArgumentError, match=message) as error:
            session.run(*args)
        assert error.value.hint


# -- 6. inspect checks hashes by default -----------------------------------------------------------


def test_inspect_refuses_a_byte_flipped_model(tiny_export, tmp_path, capsys):
    flipped = copy_of(tiny_export, tmp_path)
    data = bytearray((flipped / c.MODEL_FILE).read_bytes())
    data[-100] ^= 0x01
    (flipped / c.MODEL_FILE).write_bytes(bytes(data))
    for extra in ([], ["--check-hashes"], ["--json"]):
        code, out, err = run_cli(capsys, "inspect", flipped, *extra)
        assert code == 1 and out == "" and "model.onnx does not match the sha256" in one_error(err)
    code, out, err = run_cli(capsys, "inspect", flipped, "--no-check-hashes")
    assert code == 0 and "transformer.wpe.weight" in out and err == ""


# -- 7. numpy numbers are numbers ------------------------------------------------------------------


def test_numpy_scalars_are_accepted_and_normalised(tiny):
    plain = dict(max_new_tokens=4, do_sample=True, temperature=0.5, top_k=7, top_p=0.9, seed=3,
                 repetition_penalty=1.25, no_repeat_ngram_size=2, ignore_eos=True, num_return_sequences=2)
    numpy = dict(max_new_tokens=np.int64(4), do_sample=np.bool_(True), temperature=np.float32(0.5), top_k=np.int32(7),
                 top_p=np.float64(0.9), seed=np.uint32(3), repetition_penalty=np.float16(1.25),
                 no_repeat_ngram_size=np.int8(2), ignore_eos=np.bool_(True), num_return_sequences=np.int16(2))
    expected = [r.token_ids for r in tiny.generate("Hello there", **plain)]
    assert [r.token_ids for r in tiny.generate("Hello there", **numpy)] == expected
    assert [r.seed for r in tiny.generate("Hello there", **numpy)] == [3, 3]
    settings = GenerationSettings(**{k: v for k, v in numpy.items()})
    for name, value in plain.items():
        got = getattr(settings, name)
        assert type(got) is type(value) and got == pytest.approx(value), name
    assert "".join(tiny.stream("Hello there", **{**numpy, "num_return_sequences": 1})) == \
        tiny.generate("Hello there", **{**plain, "num_return_sequences": 1}).text
    assert tiny.generate("Hi", max_length=np.int64(5), return_full_text=np.bool_(True)).text.startswith("Hi")


def test_numpy_threads_and_cache_limit(tiny_export):
    model = gpt2onnx.load(tiny_export, threads=np.int64(1), max_cache_bytes=np.int64(2**20))
    assert model.max_cache_bytes == 2**20 and type(model.max_cache_bytes) is int


# -- 8. bounds on threads, rows and KV-cache memory ------------------------------------------------


def test_threads_are_bounded(tiny_export):
    limit = MAX_THREADS
    for threads in (limit + 1, 1000, -1, True, 1.5):
        with pytest.raises(InvalidArgumentError, match=f"threads must be an integer from 0 to {limit}") as error:
            gpt2onnx.load(tiny_export, threads=threads)
        assert error.value.hint
    assert gpt2onnx.load(tiny_export, threads=limit).session.config.n_layer == 2


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this system")
def test_threads_bound_follows_the_cpus_this_process_may_use(tiny_export):
    """A process allowed on one CPU may ask for 4 threads, not 5 (a known value, whatever the machine)."""
    code = f"""
import os
os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
import gpt2onnx
from gpt2onnx.errors import InvalidArgumentError
assert gpt2onnx.load({str(tiny_export)!r}, threads=4).session.config.n_layer == 2
try:
    gpt2onnx.load({str(tiny_export)!r}, threads=5)
except InvalidArgumentError as error:
    print(error.message)
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "threads must be an integer from 0 to 4 (4 per usable CPU, 1 here), got 5" in done.stdout, done.stdout


def test_rows_are_bounded_before_anything_runs(tiny, monkeypatch):
    monkeypatch.setattr(tiny.session, "run", lambda *a, **k: pytest.fail("the session ran"))
    with pytest.raises(InvalidArgumentError, match=r"16 prompt\(s\) x num_return_sequences=64 is 1024 rows; one call "
                                                   r"may run at most 256") as error:
        tiny.generate(["Hello"] * 16, num_return_sequences=64, do_sample=True, max_new_tokens=4)
    assert error.value.hint
    with pytest.raises(InvalidArgumentError, match="257 prompts in one call; the limit is 256 rows"):
        tiny.generate(["Hello"] * 257, max_new_tokens=4)


def test_kv_cache_memory_is_bounded(tiny_export, monkeypatch):
    per_position = 2 * 2 * 64 * 4  # key and value x n_layer x n_embd x float32, from config.json by hand
    model = gpt2onnx.load(tiny_export, max_cache_bytes=100_000)
    prompt = "Hello there"  # 2 tokens
    fits = model.generate(prompt, max_new_tokens=95, ignore_eos=True)  # (2 + 95) x 1024 = 99,328 bytes
    assert len(fits.token_ids) == 95
    monkeypatch.setattr(model.session, "run", lambda *a, **k: pytest.fail("the session ran"))
    with pytest.raises(InvalidArgumentError) as error:
        model.generate(prompt, max_new_tokens=96, ignore_eos=True)  # 98 x 1024 = 100,352 bytes
    assert error.value.message == (f"this call needs 98.0 KiB of KV cache (1 rows x 98 positions x {per_position} "
                                   "bytes); the limit is 97.7 KiB")
    assert "max_cache_bytes" in error.value.hint
    with pytest.raises(InvalidArgumentError, match=r"\(6 rows x 42 positions"):  # 4 rows + the 2 prefilled ones
        model.generate(["Hello there", "Hi"], max_new_tokens=40, num_return_sequences=2, do_sample=True)
    with pytest.raises(InvalidArgumentError, match="KV cache"):
        next(iter(model.stream(prompt, max_new_tokens=200)))
    for bad in (0, -1, True, 1.5):
        with pytest.raises(InvalidArgumentError, match="max_cache_bytes must be an integer > 0"):
            gpt2onnx.load(tiny_export, max_cache_bytes=bad)


def test_the_cache_estimate_is_what_the_loop_allocates(tiny, monkeypatch):
    allocated = []
    real = tiny.session.empty_cache

    def spy(batch, *, capacity=0):
        cache = real(batch, capacity=capacity)
        allocated.append(sum(b.nbytes for b in cache.buffers))
        return cache

    monkeypatch.setattr(tiny.session, "empty_cache", spy)
    tiny.generate(["Hello there", "Hi"], max_new_tokens=30, ignore_eos=True)
    rows, positions = 2, 2 + 30
    assert allocated == [rows * positions * 2 * 2 * 64 * 4]
    assert limits.DEFAULT_MAX_CACHE_BYTES == 4 * 2**30 and limits.MAX_ROWS == 256
