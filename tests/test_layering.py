"""Dependencies point one way: the runtime never imports the export side, torch or the benchmark's peers, and
the export side's commands join the CLI through the entry-point group `gpt2onnx.commands`."""

import ast
import importlib.metadata
from pathlib import Path

import pytest

import gpt2onnx
from gpt2onnx import plugins
from gpt2onnx.cli import main
from helpers import run_python

EXPORT_SIDE = ("gpt2onnx_export", "torch", "transformers", "optimum", "ctranslate2")
RUNTIME = Path(gpt2onnx.__file__).parent


def test_runtime_source_imports_nothing_of_the_export_side():
    """Not even lazily: no import statement anywhere in the runtime names them."""
    found = []
    for path in sorted(RUNTIME.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.name}:{node.lineno} {name}" for name in names if name.split(".")[0] in EXPORT_SIDE]
    assert found == []


def test_runtime_commands_load_nothing_of_the_export_side(tiny_export, tmp_path):
    """Every runtime module imported, then `generate`, `inspect` (and `serve`'s parser, where it exists) run in a
    fresh interpreter where all of them are installed: none of their modules is loaded."""
    code = f"""
import contextlib, importlib, importlib.util, pkgutil, sys
import gpt2onnx
from gpt2onnx.cli import main
for module in pkgutil.iter_modules(gpt2onnx.__path__):
    importlib.import_module("gpt2onnx." + module.name)
assert main(["generate", "Hello", "--model", {str(tiny_export)!r}, "--max-new-tokens", "3"]) == 0
assert main(["inspect", {str(tiny_export)!r}]) == 0
if importlib.util.find_spec("gpt2onnx.server"):
    with contextlib.suppress(SystemExit):
        main(["serve", "--help"])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {EXPORT_SIDE!r})
print("LOADED", loaded)
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout, done.stdout[-2000:]


def _entry_points(monkeypatch, *entries):
    """Make the installed metadata hold exactly these (name, "module:function") commands."""
    fake = [importlib.metadata.EntryPoint(name, value, plugins.GROUP) for name, value in entries]

    def entry_points(*, group=None):
        assert group == plugins.GROUP
        return fake

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def register_hello(subparsers, formatter):
    p = subparsers.add_parser("hello", formatter_class=formatter, help="say hello from a plugin")
    p.add_argument("--name", default="world", help="who to greet")
    p.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)


def test_a_plugin_command_joins_the_cli(monkeypatch, capsys):
    _entry_points(monkeypatch, ("hello", f"{__name__}:register_hello"))
    assert main(["hello", "--name", "gpt2"]) == 0
    assert capsys.readouterr().out == "hello gpt2\n"
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "say hello from a plugin" in capsys.readouterr().out


def test_runtime_commands_do_not_read_the_plugins(monkeypatch, tiny_export, capsys):
    def entry_points(**kwargs):
        raise AssertionError("the plugins were read for a runtime command")

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert main(["inspect", str(tiny_export)]) == 0
    assert "transformer.wpe.weight" in capsys.readouterr().out


@pytest.mark.parametrize("entries", [(), (("export", "no_such_module_here:register"),)], ids=["none", "broken"])
def test_without_the_extra_the_commands_are_listed_and_say_how_to_install(monkeypatch, capsys, entries):
    """No plugin installed (or one that cannot load): export, verify and bench are still listed with the
    install hint, and running one, whatever its arguments, is a one-line error with the hint, exit 1."""
    _entry_points(monkeypatch, *entries)
    monkeypatch.setenv("COLUMNS", "200")  # one line per command
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    for command in ("export", "verify", "bench"):
        line = next(line for line in listing.splitlines() if line.strip().startswith(command + " "))
        assert "(needs: pip install 'gpt2onnx[" in line, line
    for argv in (["export", "random:tiny", "out", "--precision", "int4"], ["verify", "--help"], ["bench"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"gpt2onnx: error: `gpt2onnx {argv[0]}` comes with the")
        assert "hint: pip install 'gpt2onnx[" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 2  # the error and its hint


def test_installed_plugin_without_torch_says_so_in_help_and_when_run(tmp_path):
    """The export package is installed with the runtime; without its extra, its commands' help says what to
    install, and loading them imported no torch."""
    code = f"""
import contextlib, io, os, sys
os.environ["COLUMNS"] = "200"  # one line per command
from gpt2onnx.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    main(["--help"])
print(out.getvalue())
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx")))
sys.exit(main(["export", "random:tiny", {str(tmp_path / "x")!r}]))
"""
    done = run_python(code, blocked=("torch", "transformers"))
    assert done.returncode == 1, done.stderr
    export_line = next(line for line in done.stdout.splitlines() if line.strip().startswith("export "))
    assert "(needs: pip install 'gpt2onnx[export]')" in export_line
    assert "LOADED []" in done.stdout
    assert "pip install 'gpt2onnx[export]'" in done.stderr and "Traceback" not in done.stderr
