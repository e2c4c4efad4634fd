"""Opening a model directory: check its manifest, read its config and start building the ONNX Runtime session
on a thread (`open_model`); `gpt2onnx.load` then builds the Model (generation/model.py), which reads the
tokenizer beside the session. This module imports only what that first half needs, so that a cold start
(`import gpt2onnx; gpt2onnx.load(dir)`, `gpt2onnx generate`) starts the session before the generation modules
are imported: the session's ~130-200 ms then run beside those imports rather than after them."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from ..format import contract as c
from ..format.config import ModelConfig
from . import user_cache
from .manifest import read_manifest
from .optimum_layout import OPTIMUM, Layout, find_layout, note_unverified
from .session import OnnxSession, SessionOptions


@dataclass(frozen=True)
class Loading:
    """A model directory whose session is being built on a thread."""

    raw_config: dict  # config.json as read
    config: ModelConfig
    session: Callable[..., OnnxSession]  # session(): waits for it (raising its error); session(errors=False) waits
    layout: Layout  # where its files are, which session runs it
    manifest: dict | None  # None for an Optimum export (no manifest to check)
    options: SessionOptions


def open_model(directory: str | Path, *, threads: int = 0, check_hashes: bool = True) -> Loading:
    """Check an exported model directory's manifest (or find an Optimum export, which has none: a log line says
    so, runtime/optimum_layout.py) and start building its session; `gpt2onnx.load` documents the arguments."""
    options = SessionOptions(threads=threads)
    layout = find_layout(directory)
    if layout.kind == OPTIMUM:
        manifest = None
        note_unverified(layout)
    else:
        manifest = read_manifest(Path(directory), check_hashes=check_hashes)
    return start(layout, manifest, options)


def start(layout: Layout, manifest: dict | None, options: SessionOptions) -> Loading:
    """Read the config and start building the session; returns once ONNX Runtime is initializing it without
    the GIL, so that what the caller does next (imports, the tokenizer) runs beside it."""
    raw_config, config = read_config(layout.config_file)
    session = _in_background(layout.open_session, config, options, released_in=_ORT_INITIALIZE,
                             model_hashes=_verified_graph_hashes(layout.directory, manifest))
    return Loading(raw_config, config, session, layout, manifest, options)


def _verified_graph_hashes(directory: Path, manifest: dict | None) -> dict[str, str] | None:
    """The manifest's sha256 of the graph's files when they are verified (by this load or an earlier one, and
    unchanged since): what the saved optimized graph is keyed on. None: not verified (check_hashes=False on a
    file never verified), so the graph is optimized afresh and not cached."""
    files = manifest.get(c.M_FILES) if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return None
    names = [name for name in (c.MODEL_FILE, c.MODEL_DATA_FILE) if name in files]
    records = user_cache.records()
    if names and all(user_cache.known_sha256(directory / name, records) == files[name] for name in names):
        return {name: files[name] for name in names}
    return None


# the call of ONNX Runtime's Python binding that builds a session (its optimizers, kernels, prepacked weights:
# most of a load) without the GIL: InferenceSession() calls it after reading the graph
_ORT_INITIALIZE = "initialize_session"


def _in_background(function, *args, released_in: str | None = None, **kwargs):
    """Start function(*args, **kwargs) on a thread; returns wait(), which gives its result or raises its error
    (wait(errors=False) only waits).

    released_in: the name of a C function that `function` calls and that runs without the GIL. Then this
    returns only once the thread is inside that call (or has ended), so that work started next on this thread
    which holds the GIL throughout (reading a tokenizer: Python, or the tokenizers library's build) runs
    beside the call, rather than first blocking the thread at its next line of Python and then running
    before it (measured: benchmarks/results/2026-12-01-cold-start.md)."""
    outcome = {}
    inside = threading.Event()

    def watch(frame, event, arg):  # a profile function of that thread only
        if event == "c_call" and getattr(arg, "__name__", None) == released_in:
            inside.set()
            sys.setprofile(None)

    def run():
        if released_in is not None:
            sys.setprofile(watch)
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as error:  # handed to the waiting thread
            outcome["error"] = error
        finally:
            sys.setprofile(None)
            inside.set()

    thread = threading.Thread(target=run, name="gpt2onnx-load", daemon=True)
    thread.start()
    if released_in is not None:
        inside.wait()

    def wait(errors: bool = True):
        thread.join()
        if errors and "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    return wait


def read_json(path: Path) -> dict:
    """A JSON object from the model directory, or a ModelLoadError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: invalid JSON or UTF-8
        raise ModelLoadError(f"{path} is not valid JSON: {error}", hint="export the model again") from error
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(value).__name__}, not an object",
                             hint="export the model again")
    return value


def read_config(path: Path) -> tuple[dict, ModelConfig]:
    """config.json as read and as a ModelConfig; a value of the wrong type is a ModelLoadError, not a traceback."""
    raw = read_json(path)
    return raw, ModelConfig.from_dict(raw, source=str(path))
