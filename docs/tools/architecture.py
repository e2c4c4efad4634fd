"""Draw docs/architecture.png: gpt2onnx's floors, lowest at the bottom, and the export side beside them.

    python docs/tools/architecture.py        # needs matplotlib (the plot extra)

The floors are those tests/test_layering.py enforces; edit FLOORS here when a module moves, then run it again.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "architecture.png"

# lowest first: (folder, what it is, its modules)
FLOORS = [
    ("errors.py, version.py", "the errors, each with a hint", ""),
    ("format/", "what an export is",
     "contract · precisions · gpt2 · config · graph_facts · matmulnbits · per_column"),
    ("runtime/", "running the graph",
     "session · kv_cache · manifest · loading · optimum_layout ·\nuser_cache · limits · cpu · heap · home"),
    ("text/", "tokens and when text is done", "tokenizer · bpe · stopping"),
    ("generation/", "the model, sampling, the engine",
     "settings · defaults · sampling · torch_random · seeding · generator · beam ·\n"
     "speculative · logprobs · loader (load) · model (Model) · pipeline · engine (Engine)"),
    ("serving/", "HTTP and Ray (serve, ray extras)",
     "openai_api · server · metrics · ray_serve · static/ (playground)"),
    ("tools/", "the command line", "cli · plugins · inspection · plot · attention"),
    ("__init__.py", "the stable API: import gpt2onnx",
     "load · Model · Generation · GenerationSettings · pipeline · set_seed ·\nEngine · EngineOptions · the errors"),
]
COLOURS = ["#eeeeee", "#dbe9f6", "#c6dbef", "#d9f0d3", "#a6dba0", "#fde0c5", "#fdd0a2", "#f2f0f7"]


def draw(path: Path = OUT) -> Path:
    fig, ax = plt.subplots(figsize=(13, 8.6), dpi=100)
    ax.set_xlim(0, 13)
    ax.set_ylim(0, 10.6)
    ax.axis("off")
    height, gap, left, width = 1.05, 0.17, 0.3, 9.4
    for i, ((folder, what, modules), colour) in enumerate(zip(FLOORS, COLOURS)):
        y = 0.3 + i * (height + gap)
        ax.add_patch(FancyBboxPatch((left, y), width, height, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    facecolor=colour, edgecolor="#555555"))
        ax.text(left + 0.15, y + height - 0.22, f"gpt2onnx/{folder}", fontsize=11, fontweight="bold", va="center",
                family="monospace")
        ax.text(left + width - 0.15, y + height - 0.22, what, fontsize=10, va="center", ha="right", style="italic")
        if modules:
            ax.text(left + 0.15, y + 0.36 if "\n" not in modules else y + 0.3, modules, fontsize=9, va="center",
                    family="monospace", color="#333333")
    top = 0.3 + len(FLOORS) * (height + gap) - gap
    ax.add_patch(FancyArrowPatch((left + width + 0.35, top - 0.2), (left + width + 0.35, 0.5), arrowstyle="-|>",
                                 mutation_scale=18, color="#444444", linewidth=1.5))
    ax.text(left + width + 0.5, top / 2, "imports point down\n(tests/test_layering.py)", fontsize=9, rotation=90,
            va="center", ha="left")
    # the export side: its own package, importing the runtime's floors, never imported by them
    ex_left, ex_y = left + width + 1.15, 1.4
    ax.add_patch(FancyBboxPatch((ex_left, ex_y), 2.0, 3.4, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor="#fbe3e8", edgecolor="#555555"))
    ax.text(ex_left + 1.0, ex_y + 3.05, "export/", fontsize=11, fontweight="bold", ha="center", family="monospace")
    ax.text(ex_left + 1.0, ex_y + 2.7, "gpt2onnx_export", fontsize=9, ha="center", family="monospace")
    ax.text(ex_left + 1.0, ex_y + 1.5, "export · verify · bench\n\ntorch, transformers,\nonnx\n(the export extra)",
            fontsize=9, ha="center", va="center")
    ax.add_patch(FancyArrowPatch((ex_left, ex_y + 1.0), (left + width + 0.05, 1.9), arrowstyle="-|>",
                                 mutation_scale=14, color="#aa3355", linewidth=1.2, linestyle="--"))
    ax.text(ex_left + 1.0, ex_y - 0.35, "imports the runtime;\nthe runtime never imports it", fontsize=8.5,
            ha="center", va="top", color="#aa3355")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(draw())
