"""Commands other packages add to the `gpt2onnx` CLI, through the entry-point group `gpt2onnx.commands`.

A package declares each command in its pyproject.toml (as this project's export side does: see
`[project.entry-points."gpt2onnx.commands"]` there), one line per command naming a function
`register(subparsers, formatter)` that adds its parser with `set_defaults(func=...)`. The CLI loads them
only when the command line may name one (`gpt2onnx --help`, `gpt2onnx export ...`; never for its own
commands), so `gpt2onnx generate` imports nothing of theirs; loading one must be cheap.

The commands this project's extras bring are known here by name, so that when their extra is not installed
`gpt2onnx --help` still lists them and running one says how to install it.
"""

from __future__ import annotations

import argparse

from ..errors import MissingDependencyError

GROUP = "gpt2onnx.commands"
# command -> (one-line help, the extra that brings it)
KNOWN = {"export": ("convert a GPT-2 checkpoint to a verified ONNX model", "export"),
         "verify": ("compare an export with PyTorch: logits, greedy, seeded sampling", "export"),
         "bench": ("measure speed against torch, Optimum, CTranslate2", "bench")}


def register(subparsers, formatter) -> None:
    """Add every installed plugin command, then a stand-in for each known one that is not installed."""
    from importlib.metadata import entry_points  # (only here: reading the installed metadata takes a while)

    order = list(KNOWN)  # the known commands in their order, then the others by name
    for entry in sorted(entry_points(group=GROUP), key=lambda e: (order.index(e.name) if e.name in order else
                                                                  len(order), e.name)):
        if entry.name in subparsers.choices:
            continue  # the first registration of a name wins
        try:
            register_command = entry.load()
        except ImportError:  # its package cannot load here: a known command gets its stand-in below
            continue
        register_command(subparsers, formatter)
    for name, (help_text, extra) in KNOWN.items():
        if name not in subparsers.choices:
            _stand_in(subparsers, name, help_text, extra)


def _stand_in(subparsers, name: str, help_text: str, extra: str) -> None:
    """A command whose extra is not installed: listed with the hint; running it (with any arguments) fails
    with the hint."""
    install = f"pip install 'gpt2onnx[{extra}]'"
    # no option prefix: every argument, --help included, is taken as given and the command says what it needs
    p = subparsers.add_parser(name, help=f"{help_text} (needs: {install})", add_help=False, prefix_chars="\0")
    p.add_argument("arguments", nargs="*")

    def missing(args: argparse.Namespace) -> int:
        raise MissingDependencyError(f"`gpt2onnx {name}` comes with the {extra} extra, which is not installed",
                                     hint=f"{install} (from a source checkout: pip install -e '.[{extra}]', which "
                                          "also registers the command)")

    p.set_defaults(func=missing)
