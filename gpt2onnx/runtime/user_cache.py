"""What one load keeps for the next, in a per-user cache directory, so that a load does not redo its work:

- **verified files**: after a file's sha256 matched its manifest, its (size, mtime, ctime, inode, device) is
  recorded with the hash; a later load trusts an unchanged file and hashes a changed one again. Any write to
  a file changes its ctime, which no user can set back, so a changed file is never trusted.
- **optimized graphs**: ONNX Runtime's graph after its optimizations (fusions, constant folding), saved on
  the first load with the weights beside it in an external data file, and opened on the next load with the
  optimizations off. Keyed by the sha256 of the model's files, the ONNX Runtime version, the optimization
  level and the CPU's feature flags (ONNX Runtime picks kernels and layouts for the CPU it optimizes on);
  not by the thread count, which leaves the saved graph byte for byte the same (checked with 1 and 2
  threads). An entry whose files changed since they were written, or that ONNX Runtime cannot open, is
  removed and written again; the model directory itself is never written to (it may be read-only).

- **tokenizer tables**: a tokenizer.json of GPT-2's kind as ByteLevelBpe.tables() writes it (gpt2onnx/text/bpe.py),
  keyed by the sha256 of the file's bytes.

What each saves, measured: benchmarks/results/2026-12-01-cold-start.md ("The user cache, measured").

The cache lives in $GPT2ONNX_CACHE_DIR, else $XDG_CACHE_HOME/gpt2onnx, else ~/.cache/gpt2onnx;
GPT2ONNX_CACHE_DIR=off turns it off. Deleting it is always safe. It keeps the MAX_GRAPHS most recently
used graphs (each about the size of its model).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

from . import cpu

CACHE_ENV = "GPT2ONNX_CACHE_DIR"
OFF = "off"
MAX_GRAPHS = 4  # optimized graphs kept (the most recently used); each is about the size of its model
MAX_RECORDS = 1024  # verified files remembered
MAX_TOKENIZERS = 16  # tokenizer tables kept (the most recently used); ~1 MB each for GPT-2's
RACY_SECONDS = 2.0  # see remember()
_RECORDS = "verified.json"
_GRAPHS = "graphs"
_TOKENIZERS = "tokenizers"
_ENTRY = "entry.json"
_GRAPH_FILE = "model.onnx"
_GRAPH_DATA = "model.onnx.data"
_lock = threading.Lock()
_memory: dict[str, list] = {}  # the records of this process, when the cache directory cannot be written


def cache_dir() -> Path | None:
    """The per-user cache directory (not created here), or None when GPT2ONNX_CACHE_DIR=off."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return None if given == OFF else Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpt2onnx"


# --------------------------------------------------------------------------------------------------------
# Verified files

def stat_key(path: Path) -> list | None:
    """What changes whenever the file is written or replaced: size, mtime, ctime, inode, device."""
    try:
        s = os.stat(path)
    except OSError:
        return None
    return [s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino, s.st_dev]


def _records_path() -> Path | None:
    directory = cache_dir()
    return None if directory is None else directory / _RECORDS


def _read_records() -> dict:
    path = _records_path()
    records = {}
    if path is not None:
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet, or damaged: start again (the files are hashed again)
            records = {}
    records = records if isinstance(records, dict) else {}
    with _lock:
        return {**records, **_memory}


def records() -> dict:
    """The records of verified files (for known_sha256)."""
    return _read_records()


def known_sha256(path: Path, verified: dict) -> str | None:
    """The file's sha256 as `verified` (from records()) has it, if the file has not changed since; else None."""
    try:
        record = verified.get(str(Path(path).resolve()))
    except (OSError, ValueError, RuntimeError):  # a name no file can have, a symlink loop
        return None
    ok = isinstance(record, list) and len(record) == 2 and isinstance(record[1], str) and record[0] is not None
    return record[1] if ok and record[0] == stat_key(path) else None


def remember(verified: dict[Path, tuple[list | None, str]]) -> None:
    """Record that these files, as `stat_key` saw them BEFORE they were hashed, have these sha256s. A file
    whose ctime is under RACY_SECONDS older than that look is not recorded: a write in the same clock tick
    would leave its stat unchanged (git's "racy" entries). A cache that cannot be written only means that
    the next process hashes the files again."""
    now = time.time_ns()
    new = {str(Path(path).resolve()): [stat, digest] for path, (stat, digest) in verified.items()
           if stat is not None and now - stat[2] > RACY_SECONDS * 1e9}
    if not new:
        return
    with _lock:
        _memory.update(new)
    path = _records_path()
    if path is None:
        return
    records = _read_records()
    for stale in list(records)[:max(0, len(records) - MAX_RECORDS)]:  # the oldest first (insertion order)
        del records[stale]
    _write_atomically(path, json.dumps(records))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # its folder cannot be made (a file in the way): nothing was written
            pass


# --------------------------------------------------------------------------------------------------------
# Optimized graphs

def cpu_flags() -> str:
    """What the CPU can do, as ONNX Runtime's kernel choice sees it: /proc/cpuinfo's flags on Linux."""
    return cpu.describe()


def graph_key(model_hashes: dict[str, str], optimization: str) -> dict:
    """What an optimized graph depends on: the model's files, ONNX Runtime's version, the level, the CPU
    (and "prepacked": entries saved before the prepacked weights were saved are not used, but written anew)."""
    import onnxruntime as ort

    return {"files": dict(sorted(model_hashes.items())), "onnxruntime": ort.__version__,
            "optimization": optimization, "prepacked": True, "cpu": hashlib.sha256(cpu_flags().encode()).hexdigest()}


def _entry_dir(key: dict) -> Path | None:
    directory = cache_dir()
    if directory is None:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return directory / _GRAPHS / digest


def cached_graph(key: dict) -> Path | None:
    """The saved graph for this key, if there is one whose files are as they were written; a damaged or
    foreign entry is removed (the next load writes it again)."""
    entry = _entry_dir(key)
    if entry is None or not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / _ENTRY).read_text(encoding="utf-8"))
        ok = (meta["key"] == key and isinstance(meta["files"], dict) and set(meta["files"]) >= {_GRAPH_FILE}
              and all(stat_key(entry / name) == stat for name, stat in meta["files"].items()))
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        discard(entry / _GRAPH_FILE)
        return None
    try:
        os.utime(entry / _ENTRY)  # most recently used: eviction keeps it
    except OSError:
        pass
    return entry / _GRAPH_FILE


def discard(graph: Path) -> None:
    """Remove the cache entry of a saved graph (damaged, or ONNX Runtime could not open it)."""
    shutil.rmtree(Path(graph).parent, ignore_errors=True)


def new_graph(key: dict) -> Path | None:
    """Where ONNX Runtime should save the optimized graph for `key` (a fresh scratch directory; `publish`
    moves it into place), or None when there is no writable cache."""
    entry = _entry_dir(key)
    if entry is None:
        return None
    scratch = entry.parent / f".{entry.name}.{os.getpid()}.{threading.get_ident()}.partial"
    try:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    except OSError:  # a read-only home, a full disk: load without the cache
        return None
    return scratch / _GRAPH_FILE


# ONNX Runtime's config entries that save the optimized graph with its weights in one external data file
# beside it (which ONNX Runtime maps, rather than copies, when it opens the graph), the 4-bit MatMulNBits
# weights also as ONNX Runtime prepacks them for this CPU (prepacking is most of an int4 session load; measured
# in benchmarks/results/2026-12-01-cold-start.md)
_SAVE_ENTRIES = {"session.optimized_model_external_initializers_file_name": _GRAPH_DATA,
                 "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
                 "session.save_external_prepacked_constant_initializers": "1"}


def open_session(path: Path, make_options, optimization: str, model_hashes: dict[str, str]):
    """An ONNX Runtime session of the model at `path`: from the saved optimized graph when the cache has one
    for these files, else from `path`, saving its optimized graph for the next load. make_options() gives
    fresh ONNX Runtime SessionOptions; model_hashes the VERIFIED sha256 of the model's files."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    key = graph_key(model_hashes, optimization)
    graph = cached_graph(key)
    if graph is not None:
        so = make_options()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done when it was saved
        try:
            return ort.InferenceSession(str(graph), so, providers=providers)
        except Exception:  # onnxruntime's own errors: an entry it cannot read is written again below
            discard(graph)
    graph = new_graph(key)
    if graph is not None:
        so = make_options()
        so.optimized_model_filepath = str(graph)
        for name, value in _SAVE_ENTRIES.items():
            so.add_session_config_entry(name, value)
        try:
            session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception:  # saving failed (a full disk?), or the model is damaged: see below, without saving
            shutil.rmtree(graph.parent, ignore_errors=True)
        else:
            publish(graph, key)
            return session
    return ort.InferenceSession(str(path), make_options(), providers=providers)


def publish(graph: Path, key: dict) -> None:
    """Move a freshly saved graph into the cache (another process may have been first: then drop ours)."""
    scratch = Path(graph).parent
    entry = _entry_dir(key)
    try:
        files = {p.name: stat_key(p) for p in scratch.iterdir()}
        if _GRAPH_FILE not in files or entry is None:
            raise OSError("ONNX Runtime saved no graph")
        (scratch / _ENTRY).write_text(json.dumps({"key": key, "files": files}), encoding="utf-8")
        os.rename(scratch, entry)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
        return
    _evict(entry.parent)


def _evict(graphs: Path) -> None:
    """Keep the MAX_GRAPHS most recently used entries (and no scratch directory of a process long gone)."""
    entries, now = [], time.time()
    for path in graphs.iterdir():
        try:
            if path.name.endswith(".partial"):  # a scratch directory: being written, or left by a killed process
                if now - path.stat().st_mtime > 3600:
                    shutil.rmtree(path, ignore_errors=True)
                continue
            entries.append(((path / _ENTRY).stat().st_mtime, path))
        except OSError:
            continue  # a damaged entry (cached_graph removes it), or one just removed by another process
    for _, path in sorted(entries, reverse=True)[MAX_GRAPHS:]:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------
# Tokenizer tables

def _tables_path(digest: str) -> Path | None:
    directory = cache_dir()
    return None if directory is None else directory / _TOKENIZERS / f"{digest}.txt"


def tokenizer_tables(digest: str) -> str | None:
    """The tables saved for the tokenizer.json whose bytes have this sha256, or None."""
    path = _tables_path(digest)
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError):  # none yet, or not UTF-8 (damaged: written again)
        return None
    try:
        os.utime(path)  # most recently used: eviction keeps it
    except OSError:  # a read-only cache: still used
        pass
    return text


def save_tokenizer_tables(digest: str, text: str) -> None:
    """Keep the tables for the next load (a cache that cannot be written only means parsing again)."""
    path = _tables_path(digest)
    if path is None:
        return
    _write_atomically(path, text)
    try:
        saved = sorted(((p.stat().st_mtime, p) for p in path.parent.glob("*.txt")), reverse=True)
    except OSError:  # one removed by another process meanwhile: the next save evicts
        return
    for _, stale in saved[MAX_TOKENIZERS:]:
        try:
            stale.unlink(missing_ok=True)
        except OSError:  # a cache that cannot be written: kept as it is
            pass
