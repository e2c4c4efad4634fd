"""PNG pictures of an exported model: the positional embeddings, any weight matrix, and the attention a
prompt actually produces (computed by ONNX Runtime, see `attention`).

    paths = plot_model("out/random-gpt2", "plots", prompt="The cat sat on the mat")

Needs the `plot` extra (matplotlib and onnx). Figures have fixed sizes (no tight cropping), so a file's
pixel size depends only on what it shows: see the *_INCHES constants and DPI.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InvalidArgumentError, MissingDependencyError, OutputError
from ..runtime.limits import check_threads
from ..runtime.manifest import read_manifest
from .attention import AttentionMaps, attention_maps
from .inspection import PLOT_EXTRA_HINT, ModelFile

DEFAULT_PROMPT = "The cat sat on the mat because it was tired."
DEFAULT_WEIGHT = "transformer.h.0.attn.c_attn.weight"
DEFAULT_SLICE = "0:300,0:300"
DEFAULT_DIMS = (0, 1, 2, 3)
DEFAULT_POSITIONS = 150

DPI = 100
HEATMAP_INCHES = (10.0, 5.0)  # the positional-embedding heat map and any 2-D weight
LINES_INCHES = (10.0, 4.0)  # positional dimensions over positions, and 1-D weights
HEAD_INCHES = 4.0  # each head's square in an attention figure
ATTENTION_COLUMNS = 4  # heads per row
ATTENTION_TITLE_INCHES = 0.5


def _figure(size: tuple[float, float]):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MissingDependencyError("plotting needs matplotlib (the plot extra)", hint=PLOT_EXTRA_HINT) from error
    return Figure(figsize=size, dpi=DPI, layout="constrained")  # no pyplot: no GUI backend, no global state


def _save(figure, path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=DPI, format="png")
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}",
                          hint="choose an output directory you can write to, on a disk with room") from error
    return path


# -- one picture each ------------------------------------------------------------------------------


def plot_positional_embeddings(wpe: np.ndarray, path: Path) -> Path:
    """Heat map of the positional embedding matrix: positions down, embedding dimensions across."""
    figure = _figure(HEATMAP_INCHES)
    ax = figure.add_subplot()
    limit = float(np.abs(wpe).max()) or 1.0
    image = ax.imshow(wpe, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set(title=f"transformer.wpe.weight {list(wpe.shape)}", xlabel="embedding dimension", ylabel="position")
    figure.colorbar(image, ax=ax)
    return _save(figure, Path(path))


def plot_positional_dims(wpe: np.ndarray, path: Path, *, dims: Sequence[int] = DEFAULT_DIMS,
                         positions: int = DEFAULT_POSITIONS) -> Path:
    """Chosen embedding dimensions of the positional embedding over the first `positions` positions."""
    _check_dims(dims, positions, wpe.shape)
    figure = _figure(LINES_INCHES)
    ax = figure.add_subplot()
    for d in dims:
        ax.plot(np.arange(positions), wpe[:positions, d], label=f"dim {d}")
    ax.set(title=f"transformer.wpe.weight[:{positions}, dim]", xlabel="position", ylabel="value")
    ax.legend(loc="upper right", fontsize="small")
    return _save(figure, Path(path))


def plot_weight(weight: np.ndarray, path: Path, *, name: str, weight_slice: str = DEFAULT_SLICE) -> Path:
    """A weight (or the part `weight_slice` selects, e.g. "0:300,0:300"): heat map if 2-D, line if 1-D."""
    index = parse_slice(weight_slice, weight.shape, name=name)
    part = weight[index]
    title = f"{name}[{weight_slice}]: {list(part.shape)} of {list(weight.shape)}"
    kept = [np.arange(*s.indices(n)) for s, n in zip(index, weight.shape) if isinstance(s, slice)]
    if part.ndim == 1:
        figure = _figure(LINES_INCHES)
        ax = figure.add_subplot()
        ax.plot(kept[0], part)
        ax.set(title=title, xlabel="index", ylabel="value")
        return _save(figure, Path(path))
    rows, cols = kept
    figure = _figure(HEATMAP_INCHES)
    ax = figure.add_subplot()
    limit = float(np.abs(part).max()) or 1.0
    extent = (cols[0] - 0.5, cols[-1] + 0.5, rows[-1] + 0.5, rows[0] - 0.5)
    image = ax.imshow(part, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest",
                      extent=extent)
    ax.set(title=title, xlabel="column", ylabel="row")
    figure.colorbar(image, ax=ax)
    return _save(figure, Path(path))


def plot_attention(maps: AttentionMaps, path: Path, *, layer: int, heads: Sequence[int] | None = None) -> Path:
    """One layer's attention probabilities, a square per head: query tokens down, key tokens across."""
    n_layer, n_head, n_tokens, _ = maps.probs.shape
    _check_indices([layer], n_layer, "layer")
    heads = list(range(n_head)) if heads is None else list(heads)
    _check_indices(heads, n_head, "head")
    columns = min(len(heads), ATTENTION_COLUMNS)
    rows = math.ceil(len(heads) / columns)
    figure = _figure(attention_inches(len(heads)))
    labels = [t.replace("\n", "\\n").replace("\t", "\\t") for t in maps.tokens]
    every = max(1, math.ceil(n_tokens / 40))  # at most ~40 labels per axis
    fontsize = max(5.0, min(9.0, 220 / min(n_tokens, 40)))
    for k, head in enumerate(heads):
        ax = figure.add_subplot(rows, columns, k + 1)
        image = ax.imshow(maps.probs[layer, head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ticks = np.arange(0, n_tokens, every)
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=fontsize)
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=fontsize)
        ax.set_title(f"head {head}", fontsize=10)
    figure.suptitle(f"attention, layer {layer} (row: query token, column: key token it attends to)")
    figure.colorbar(image, ax=figure.axes, shrink=0.8)
    return _save(figure, Path(path))


def attention_inches(n_heads: int) -> tuple[float, float]:
    """The size of an attention figure showing `n_heads` heads."""
    columns = min(n_heads, ATTENTION_COLUMNS)
    rows = math.ceil(n_heads / columns)
    return HEAD_INCHES * columns, HEAD_INCHES * rows + ATTENTION_TITLE_INCHES


# -- everything at once ----------------------------------------------------------------------------


def plot_model(directory: str | Path, out_dir: str | Path, *, prompt: str = DEFAULT_PROMPT,
               weight: str = DEFAULT_WEIGHT, weight_slice: str = DEFAULT_SLICE,
               dims: Sequence[int] = DEFAULT_DIMS, positions: int = DEFAULT_POSITIONS,
               layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
               threads: int = 0) -> list[Path]:
    """Write the PNGs of an exported model into out_dir and return their paths.

    prompt: the text whose attention maps are drawn (its tokens label both axes).
    weight: the state-dict name of the weight matrix to draw (`gpt2onnx inspect` lists them).
    weight_slice: the part of it to draw, one `start:stop[:step]` or index per dimension.
    dims: positional-embedding dimensions to draw over the positions.
    positions: how many positions (from 0) those lines cover.
    layers: the layers to draw attention for (None: all).
    heads: the heads to draw in each of those layers (None: all).
    threads: ONNX Runtime intra-op threads for the attention run; 0 uses one per physical core.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"the output directory {out} is an existing file, not a directory",
                                   hint="name a directory for the PNGs (it is created if missing)")
    threads = check_threads(threads)
    read_manifest(Path(directory))  # hashes and the manifest's claims, as gpt2onnx.load checks them
    model = ModelFile(directory)
    config = model.config
    layers = list(range(config.n_layer)) if layers is None else list(layers)
    _check_indices(layers, config.n_layer, "layer")
    if heads is not None:
        _check_indices(list(heads), config.n_head, "head")
    wpe = model.weight("transformer.wpe.weight")
    matrix = model.weight(weight)
    parse_slice(weight_slice, matrix.shape, name=weight)  # fail on a bad slice before any work
    _check_dims(dims, positions, wpe.shape)
    maps = attention_maps(directory, prompt, threads=threads, check_hashes=False)  # checked above
    paths = [plot_positional_embeddings(wpe, out / "positional-embedding.png"),
             plot_positional_dims(wpe, out / "positional-dims.png", dims=dims, positions=positions),
             plot_weight(matrix, out / f"weight-{weight}.png", name=weight, weight_slice=weight_slice)]
    paths += [plot_attention(maps, out / f"attention-layer{layer}.png", layer=layer, heads=heads) for layer in layers]
    return paths


# -- arguments -------------------------------------------------------------------------------------


def parse_slice(text: str, shape: tuple[int, ...], *, name: str = "the weight") -> tuple:
    """"0:300,0:300" -> (slice(0, 300), slice(0, 300)), checked against `shape`; one part per dimension at
    most (missing trailing parts mean the whole dimension). A part is `start:stop[:step]` or an index."""
    parts = [p.strip() for p in str(text).split(",")] if str(text).strip() else []
    allowed = f"{name} has shape {list(shape)}: give up to {len(shape)} comma-separated start:stop or index parts"
    if len(parts) > len(shape):
        raise InvalidArgumentError(f"slice {text!r} has {len(parts)} parts", hint=allowed)
    index = []
    for part, size in zip(parts + [":"] * (len(shape) - len(parts)), shape):
        try:
            numbers = [int(x) if x.strip() else None for x in part.split(":")]
        except ValueError:
            raise InvalidArgumentError(f"slice part {part!r} of {text!r} is not start:stop[:step] or an index",
                                       hint=allowed) from None
        if len(numbers) == 1 and numbers[0] is not None:
            if not -size <= numbers[0] < size:
                raise InvalidArgumentError(f"index {numbers[0]} in {text!r} is out of range for a dimension of {size}",
                                           hint=allowed)
            index.append(numbers[0])
        elif 2 <= len(numbers) <= 3 and numbers[2:] != [0]:
            s = slice(*numbers)
            if len(range(*s.indices(size))) == 0:
                raise InvalidArgumentError(f"slice part {part!r} of {text!r} selects nothing of a dimension of {size}",
                                           hint=allowed)
            index.append(s)
        else:
            raise InvalidArgumentError(f"slice part {part!r} of {text!r} is not start:stop[:step] or an index",
                                       hint=allowed)
    if sum(isinstance(i, slice) for i in index) not in (1, 2):
        raise InvalidArgumentError(f"slice {text!r} leaves {sum(isinstance(i, slice) for i in index)} dimensions; "
                                   "a picture needs 1 (a line) or 2 (a heat map)", hint=allowed)
    return tuple(index)


def _check_dims(dims: Sequence[int], positions: int, shape: tuple[int, int]) -> None:
    n_positions, n_embd = shape
    bad = [d for d in dims if not isinstance(d, (int, np.integer)) or not 0 <= d < n_embd]
    if bad or not dims:
        raise InvalidArgumentError(f"positional dimension(s) {', '.join(map(str, bad)) or '(none)'} out of range",
                                   hint=f"this model has embedding dimensions 0 to {n_embd - 1}")
    if not isinstance(positions, (int, np.integer)) or not 1 <= positions <= n_positions:
        raise InvalidArgumentError(f"positions must be between 1 and n_positions={n_positions}, got {positions!r}",
                                   hint=f"this model has {n_positions} positions")


def _check_indices(values: Sequence[int], count: int, what: str) -> None:
    bad = [v for v in values if not isinstance(v, (int, np.integer)) or not 0 <= v < count]
    if bad or not values:
        raise InvalidArgumentError(f"{what}(s) {', '.join(map(str, bad)) or '(none)'} out of range",
                                   hint=f"this model has {what}s 0 to {count - 1}")
