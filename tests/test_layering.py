"""The floors: dependencies point one way, down. The runtime never imports the export side, torch or the benchmark's
peers; within gpt2onnx/, a module imports only from its own floor or the floors below it (lazily too: an import
inside a function counts); and the export side's commands join the CLI through the entry-point group
`gpt2onnx.commands`."""

import ast
import importlib.metadata
from pathlib import Path

import pytest

import gpt2onnx
from gpt2onnx.tools import plugins
from gpt2onnx.tools.cli import main
from helpers import run_python

EXPORT_SIDE = ("gpt2onnx_export", "torch", "transformers", "optimum", "ctranslate2")
RUNTIME = Path(gpt2onnx.__file__).parent
# lowest first; the package's face (gpt2onnx/__init__.py, __main__.py) stands above them all
FLOORS = {"errors": 0, "version": 0, "format": 1, "runtime": 2, "text": 3, "generation": 4, "serving": 5, "tools": 6,
          "__init__": 7, "__main__": 7}


def _modules() -> dict[str, Path]:
    """Every module of the runtime, sub-packages included: dotted name -> file."""
    modules = {}
    for path in sorted(RUNTIME.rglob("*.py")):
        parts = path.relative_to(RUNTIME.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import statement in a module, at any depth (lazy ones too); `from X import
    y` gives X.y when that is a module of ours, else X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}") if f"{base}.{alias.name}" in _modules() else
                      (node.lineno, base) for alias in node.names]
    return found


def _floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS["__init__"] if len(parts) == 1 else FLOORS[parts[1]]


def test_every_runtime_module_stands_on_a_named_floor():
    """A new sub-package or top-level module must be given its floor here before anything can import it."""
    unplaced = sorted(name for name in _modules() if name != "gpt2onnx" and name.split(".")[1] not in FLOORS)
    assert unplaced == []
    assert len(_modules()) > 40  # the walk reaches into the sub-packages


def test_runtime_source_imports_nothing_of_the_export_side():
    """Not even lazily: no import statement anywhere in the runtime names them."""
    found = [f"{name}:{line} {target}" for name, path in _modules().items() for line, target in _imports(name, path)
             if target.split(".")[0] in EXPORT_SIDE]
    assert found == []


def test_no_import_runs_up_a_floor():
    """format < runtime < text < generation < serving < tools < the package's face; errors and version below all."""
    upward = [f"{name}:{line} imports {target}" for name, path in _modules().items()
              for line, target in _imports(name, path)
              if target.split(".")[0] == "gpt2onnx" and _floor(target) > _floor(name)]
    assert upward == []


def test_the_modules_import_each_other_in_no_circle():
    modules = _modules()
    graph = {name: {target for _, target in _imports(name, path) if target in modules and target != name}
             for name, path in modules.items()}
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}  # parents
    state, circles = {}, []

    def visit(name, trail):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                circles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_the_layering_check_sees_an_upward_import(tmp_path):
    """The check itself: a runtime module importing the serving floor would be found."""
    path = tmp_path / "fake.py"
    path.write_text("def f():\n    from ..serving import server\n")
    imports = _imports("gpt2onnx.runtime.fake", path)
    assert imports == [(2, "gpt2onnx.serving.server")]
    assert _floor(imports[0][1]) > _floor("gpt2onnx.runtime.fake")


def test_runtime_commands_load_nothing_of_the_export_side(tiny_export, tmp_path):
    """Every runtime module imported, then `generate`, `inspect` (and `serve`'s parser, where it exists) run in a
    fresh interpreter where all of them are installed: none of their modules is loaded."""
    code = f"""
import contextlib, importlib, importlib.util, pkgutil, sys
import gpt2onnx
from gpt2onnx.tools.cli import main
for module in pkgutil.walk_packages(gpt2onnx.__path__, "gpt2onnx."):
    if module.name != "gpt2onnx.__main__":  # that one runs the command line
        importlib.import_module(module.name)
assert main(["generate", "Hello", "--model", {str(tiny_export)!r}, "--max-new-tokens", "3"]) == 0
assert main(["inspect", {str(tiny_export)!r}]) == 0
if importlib.util.find_spec("gpt2onnx.serving.server"):
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
from gpt2onnx.tools.cli import main
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
