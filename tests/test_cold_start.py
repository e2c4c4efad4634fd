"""Cold start: what one load keeps for the next (gpt2onnx/runtime/user_cache.py) never changes a result or weakens a
check. The saved optimized graph gives the logits of the model itself; a damaged, stale or unreadable cache
entry is written again; an unchanged file is not hashed again, a changed one is, and a damaged one is still
refused; the model directory is never written to; `gpt2onnx generate` imports none of the server's modules."""

import inspect
import json
import os
import shutil
import threading
import time

import numpy as np
import onnxruntime
import pytest
from onnxruntime.capi import _pybind_state

import gpt2onnx
from gpt2onnx.errors import ModelLoadError
from gpt2onnx.format import contract as c
from gpt2onnx.format.gpt2 import position_ids
from gpt2onnx.runtime import manifest as manifest_module
from gpt2onnx.runtime import user_cache
from gpt2onnx.runtime.loading import _ORT_INITIALIZE, _in_background
from gpt2onnx.runtime.session import OnnxSession, SessionOptions
from helpers import quantized_copy, run_python

PROMPT = [[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]]


@pytest.fixture
def cache(cache, monkeypatch):
    """conftest's fresh user cache, in which files count as settled as soon as they are hashed."""
    monkeypatch.setattr(user_cache, "RACY_SECONDS", 0.0)
    return cache


@pytest.fixture
def model_dir(tiny_export, tmp_path):
    return shutil.copytree(tiny_export, tmp_path / "model")


@pytest.fixture(scope="module")
def int4_dir(tiny_export, tmp_path_factory):
    return quantized_copy(tiny_export, tmp_path_factory.mktemp("int4") / "model", bits=4, block_size=32)


def _graphs(cache) -> list:
    return sorted(p for p in (cache / "graphs").iterdir() if not p.name.startswith(".")) if (
        cache / "graphs").is_dir() else []


def _logits(directory, *, cached: bool) -> np.ndarray:
    """Prefill logits of PROMPT from a session on the plain model (cached=False: no hashes, nothing saved)
    or through the user cache."""
    manifest = gpt2onnx.load(directory).manifest if cached else None
    hashes = {c.MODEL_FILE: manifest[c.M_FILES][c.MODEL_FILE]} if cached else None
    config = gpt2onnx.load(directory, check_hashes=False).config
    session = OnnxSession(directory / c.MODEL_FILE, config, SessionOptions(), model_hashes=hashes)
    ids = np.array(PROMPT, np.int64)
    mask = np.ones_like(ids)
    logits, _ = session.run(ids, mask, position_ids(mask), session.empty_cache(1))
    return logits.copy()


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_the_saved_graph_gives_the_logits_of_the_model(precision, model_dir, int4_dir, cache):
    directory = model_dir if precision == "fp32" else int4_dir
    plain = _logits(directory, cached=False)
    gpt2onnx.load(directory)  # the first load saves the optimized graph
    (entry,) = _graphs(cache)
    assert (entry / "model.onnx").is_file() and (entry / "model.onnx.data").is_file()
    cached = _logits(directory, cached=True)  # opened from the saved graph
    print(f"{precision}: max |saved - plain| = {np.abs(cached - plain).max():.3g}")
    np.testing.assert_allclose(cached, plain, rtol=0, atol=1e-5)
    assert _graphs(cache) == [entry]  # reused, not written again


def test_a_second_load_opens_the_saved_graph_and_hashes_nothing(model_dir, cache, monkeypatch):
    first = gpt2onnx.load(model_dir).generate("Hello", max_new_tokens=8).token_ids
    hashed = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    opened = []
    import onnxruntime as ort

    class Recording(ort.InferenceSession):
        def __init__(self, path, *args, **kwargs):
            opened.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", Recording)
    again = gpt2onnx.load(model_dir).generate("Hello", max_new_tokens=8).token_ids
    assert again == first
    assert hashed == []
    assert len(opened) == 1 and opened[0].startswith(str(cache / "graphs"))


def _entry_files(cache):
    (entry,) = _graphs(cache)
    return entry


@pytest.mark.parametrize("damage", ["weights", "graph", "entry-json", "unreadable-graph"])
def test_a_damaged_cache_entry_is_written_again(damage, model_dir, cache):
    reference = _logits(model_dir, cached=False)
    gpt2onnx.load(model_dir)
    entry = _entry_files(cache)
    if damage == "weights":  # same size, same mtime: the ctime still tells
        data = entry / "model.onnx.data"
        stat = data.stat()
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    elif damage == "graph":
        (entry / "model.onnx").write_bytes(b"not a graph")
    elif damage == "entry-json":
        (entry / "entry.json").write_text("{")
    else:  # garbage that the record vouches for: ONNX Runtime refuses it, and the entry is made again
        (entry / "model.onnx").write_bytes(b"\x00garbage")
        meta = json.loads((entry / "entry.json").read_text())
        meta["files"]["model.onnx"] = user_cache.stat_key(entry / "model.onnx")
        (entry / "entry.json").write_text(json.dumps(meta))
    np.testing.assert_array_equal(_logits(model_dir, cached=True), reference)
    rebuilt = _entry_files(cache)
    assert (rebuilt / "model.onnx").read_bytes()[:4] != b"\x00gar"
    assert user_cache.cached_graph(json.loads((rebuilt / "entry.json").read_text())["key"]) is not None


def test_an_entry_of_another_onnxruntime_or_cpu_is_not_used(model_dir, cache, monkeypatch):
    gpt2onnx.load(model_dir)
    monkeypatch.setattr(user_cache, "cpu_flags", lambda: "another cpu")
    gpt2onnx.load(model_dir)
    assert len(_graphs(cache)) == 2  # keyed apart: one per CPU


def test_a_read_only_model_directory_is_never_written(model_dir, cache):
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    for path in [*model_dir.iterdir(), model_dir]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        assert gpt2onnx.load(model_dir).generate("Hello", max_new_tokens=3).token_ids
        assert gpt2onnx.load(model_dir).generate("Hello", max_new_tokens=3).token_ids
    finally:
        model_dir.chmod(0o755)
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before
    assert len(_graphs(cache)) == 1


def test_no_usable_cache_directory_still_loads(model_dir, tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv(user_cache.CACHE_ENV, str(blocked / "cache"))  # cannot be created
    assert gpt2onnx.load(model_dir).generate("Hello", max_new_tokens=3).token_ids
    monkeypatch.setenv(user_cache.CACHE_ENV, user_cache.OFF)
    assert user_cache.cache_dir() is None
    assert gpt2onnx.load(model_dir).generate("Hello", max_new_tokens=3).token_ids


@pytest.mark.parametrize("name", [c.MODEL_FILE, c.TOKENIZER_FILE])
def test_a_file_changed_after_it_was_verified_is_hashed_again_and_refused(name, model_dir, cache, monkeypatch):
    gpt2onnx.load(model_dir)
    path = model_dir / name
    stat = path.stat()
    raw = bytearray(path.read_bytes())
    raw[-2] ^= 0x01  # same size; the old mtime put back: only the ctime (and the content) changed
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ModelLoadError, match="does not match the sha256"):
        gpt2onnx.load(model_dir)
    monkeypatch.setattr(user_cache, "_memory", {})  # another process: only the file on disk
    with pytest.raises(ModelLoadError, match="does not match the sha256"):
        gpt2onnx.load(model_dir)


def test_a_file_replaced_by_an_identical_copy_is_hashed_again_and_trusted(model_dir, cache, monkeypatch):
    gpt2onnx.load(model_dir)
    path = model_dir / c.TOKENIZER_FILE
    shutil.copy2(path, model_dir / "copy")
    os.replace(model_dir / "copy", path)  # a new inode
    hashed = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    gpt2onnx.load(model_dir)
    assert hashed == [c.TOKENIZER_FILE]


def test_unverified_files_are_not_cached(model_dir, cache, monkeypatch):
    """check_hashes=False on files never verified: the graph is optimized afresh and nothing is saved (the
    cache is keyed on verified hashes only); the same files, verified, are saved."""
    opened = []

    class Recording(onnxruntime.InferenceSession):
        def __init__(self, path, options, *args, **kwargs):
            opened.append((str(path), options.graph_optimization_level, options.optimized_model_filepath))
            super().__init__(path, options, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Recording)
    assert gpt2onnx.load(model_dir, check_hashes=False).generate("Hello", max_new_tokens=3).token_ids
    # the model's own graph, optimized in this load (not a saved one, which opens with optimization off), unsaved
    assert [(path, level != onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL, saved)
            for path, level, saved in opened] == [(str(model_dir / c.MODEL_FILE), True, "")]
    assert _graphs(cache) == []
    gpt2onnx.load(model_dir)  # verified: its optimized graph is saved
    assert len(_graphs(cache)) == 1 and len(opened) == 2 and opened[1][2].startswith(str(cache))


def test_a_damaged_record_file_means_hashing_again(model_dir, cache, monkeypatch):
    gpt2onnx.load(model_dir)
    monkeypatch.setattr(user_cache, "_memory", {})
    (cache / "verified.json").write_text("[1, 2")
    hashed = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    gpt2onnx.load(model_dir)
    assert c.MODEL_FILE in hashed


def test_generate_imports_none_of_the_server_modules(tiny_export, tmp_path):
    code = f"""
import os, sys
os.environ[{user_cache.CACHE_ENV!r}] = {str(tmp_path / "cache")!r}
from gpt2onnx.tools.cli import main
assert main(["generate", "Hello", "-m", {str(tiny_export)!r}, "--max-new-tokens", "2"]) == 0
prefixes = ("gpt2onnx.generation.engine", "gpt2onnx.serving.server", "gpt2onnx.tools.plot",
            "gpt2onnx.tools.inspection", "asyncio", "fastapi", "gpt2onnx_export", "torch", "transformers",
            "matplotlib", "uvicorn", "ray")  # nor the export side
print("LOADED", sorted(m for m in sys.modules if m.startswith(prefixes) or m == "onnx" or m.startswith("onnx.")))
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout, done.stdout


def test_load_builds_the_session_while_the_generation_modules_are_imported(tiny_export, tmp_path):
    """`import gpt2onnx` imports none of the generation modules; `gpt2onnx.load` imports them only once the
    session is being built on its thread (loading.py), so that the two run side by side; gpt2onnx.Model and
    gpt2onnx.Generation are there when asked for."""
    code = f"""
import os, sys, threading
os.environ[{user_cache.CACHE_ENV!r}] = {str(tmp_path / "cache")!r}
LATER = ("gpt2onnx.generation.model", "gpt2onnx.generation.generator", "gpt2onnx.generation.sampling",
         "gpt2onnx.generation.speculative", "gpt2onnx.generation.beam")
building = {{}}  # module -> whether the session's thread was running when it was imported

def audit(event, args):
    if event == "import" and args[0] in LATER and args[0] not in building:
        building[args[0]] = any(t.name == "gpt2onnx-load" for t in threading.enumerate())

sys.addaudithook(audit)
import gpt2onnx
assert not building and not any(name in sys.modules for name in LATER), building
for _ in range(2):
    model = gpt2onnx.load({str(tiny_export)!r})
    assert model.generate("Hello", max_new_tokens=2).token_ids
import gpt2onnx.generation.model
assert gpt2onnx.Model is gpt2onnx.generation.model.Model and gpt2onnx.Generation is gpt2onnx.generation.model.Generation
assert {{"Model", "Generation", "load"}} <= set(dir(gpt2onnx))
try:
    gpt2onnx.NoSuchThing
except AttributeError as error:
    assert "NoSuchThing" in str(error)
else:
    raise AssertionError("no AttributeError")
print("BUILDING", sorted(building.items()))
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    later = ("gpt2onnx.generation.beam", "gpt2onnx.generation.generator", "gpt2onnx.generation.model",
             "gpt2onnx.generation.sampling", "gpt2onnx.generation.speculative")
    assert f"BUILDING {[(name, True) for name in later]}" in done.stdout, done.stdout


def test_the_program_prints_everything_before_it_ends_without_teardown(tiny_export):
    """`gpt2onnx generate` as a program ends with os._exit after flushing: the whole output is there."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "gpt2onnx", "generate", "Hello", "-m", str(tiny_export), "--max-new-tokens", "3"]
    done = subprocess.run(base + ["--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    assert len(result["token_ids"]) == 3
    streamed = subprocess.run(base + ["--stream"], capture_output=True, text=True)
    assert streamed.returncode == 0 and streamed.stdout == "Hello" + result["text"] + "\n"


def test_only_the_most_recently_used_graphs_are_kept(model_dir, int4_dir, cache, monkeypatch):
    monkeypatch.setattr(user_cache, "MAX_GRAPHS", 1)
    gpt2onnx.load(model_dir)
    (first,) = _graphs(cache)
    gpt2onnx.load(int4_dir)
    (second,) = _graphs(cache)
    assert second != first
    stale = cache / "graphs" / ".gone.123.456.partial"  # left by a killed process
    stale.mkdir()
    os.utime(stale, (0, 0))
    gpt2onnx.load(model_dir)
    assert _graphs(cache) != [second] and not stale.exists()


def test_a_damaged_tokenizer_and_graph_report_the_tokenizer(model_dir, cache):
    """Both load side by side: when both fail, the error is the tokenizer's (as before), never a traceback of
    the loading thread."""
    (model_dir / c.MODEL_FILE).write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelLoadError, match="ONNX Runtime cannot load"):  # (Model: no manifest check first)
        gpt2onnx.Model(model_dir, manifest=None)
    (model_dir / c.TOKENIZER_FILE).write_text("{")
    with pytest.raises(ModelLoadError, match="cannot read the tokenizer"):
        gpt2onnx.Model(model_dir, manifest=None)


def test_the_tokenizer_starts_once_the_session_is_inside_the_call_that_releases_the_gil():
    """_in_background(released_in=NAME) returns once its thread is inside the C function NAME (here time.sleep,
    which releases the GIL as ONNX Runtime's session initialization does), not before and not after it."""
    before, after = threading.Event(), threading.Event()

    def load():
        sum(range(200_000))  # Python work first, as ONNX Runtime's wrapper does before its C call
        before.set()
        time.sleep(0.5)
        after.set()
        return "session"

    wait = _in_background(load, released_in="sleep")
    assert before.is_set() and not after.is_set()
    assert wait() == "session" and after.is_set()


@pytest.mark.parametrize("fails", [False, True])
def test_a_thread_that_never_makes_the_call_does_not_hold_the_load_up(fails):
    """A session that fails before its C call (a damaged graph), or a function that never makes it: the
    wait ends with the thread, and its error reaches wait()."""
    def load():
        if fails:
            raise ModelLoadError("damaged")
        return 7

    wait = _in_background(load, released_in="sleep")
    if fails:
        with pytest.raises(ModelLoadError, match="damaged"):
            wait()
    else:
        assert wait() == 7


def test_onnxruntime_builds_its_sessions_in_the_call_the_load_waits_for():
    """The load waits for its session thread to enter ONNX Runtime's `initialize_session`: if a new ONNX
    Runtime renamed it, the load would still work but serially (tokenizer after session), so say it here."""
    assert hasattr(_pybind_state.InferenceSession, _ORT_INITIALIZE)
    assert f".{_ORT_INITIALIZE}(" in inspect.getsource(onnxruntime.InferenceSession._create_inference_session)
