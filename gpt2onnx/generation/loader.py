"""`gpt2onnx.load`: open a model directory (runtime/loading.py starts its session on a thread), then import the
generation modules and build the Model beside the session's initialization, so that a cold start
(`import gpt2onnx; gpt2onnx.load(dir)`, `gpt2onnx generate`) pays for those imports while ONNX Runtime works."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..runtime import heap, limits
from ..runtime.loading import open_model

if TYPE_CHECKING:
    from .model import Model


def load(directory: str | Path, *, threads: int = 0, check_hashes: bool = True,
         max_cache_bytes: int = limits.DEFAULT_MAX_CACHE_BYTES) -> Model:
    """Load an exported model directory after checking its manifest, or a GPT-2 Optimum exported
    (text-generation-with-past; the directory, or a Hub-style repository with it in onnx/), which has no
    manifest to check: a log line says so.

    threads: ONNX Runtime intra-op threads; 0 uses one per physical core (at most 4 per usable CPU).
    check_hashes: verify the sha256 of every file against the manifest (a few seconds for large models). A
        file that matched once is not hashed again while its size, mtime, ctime and inode are unchanged (a
        record in the user cache); a changed file is hashed again. False skips the check, and then the
        optimized graph is cached only for a model file verified before.
    max_cache_bytes: the most KV cache one generate/stream call may reserve (default 4 GiB); a call that
        needs more is refused before it runs.
    """
    max_cache_bytes = limits.check_cache_bytes(max_cache_bytes)
    loading = open_model(directory, threads=threads, check_hashes=check_hashes)
    # the generation modules (~30% of a cold import) are imported here, beside the session's initialization
    with heap.collector_paused():
        from .model import Model
    return Model.opened(loading, max_cache_bytes=max_cache_bytes)
