"""The package as a user installs it: `python -m build` makes an sdist and a wheel without a warning; the
LICENSE ships in both; the wheel carries every module of gpt2onnx/ (pyproject lists the packages by name),
the playground's files and the export step as gpt2onnx_export."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "gpt2onnx", "export")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(build's output, sdist names, wheel names) of a build of a copy of the sources (the build writes egg-info
    beside them). --no-isolation: the installed setuptools, so that no index is needed (a user's isolated build
    fetches setuptools>=77 first and builds the same)."""
    pytest.importorskip("build")
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    # PYTHONDONTWRITEBYTECODE (set in some CI images) makes setuptools warn that byte-compiling is off
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(work / "dist"),
                           str(source)], capture_output=True, text=True, env=env, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    (sdist,) = (work / "dist").glob("*.tar.gz")
    (wheel,) = (work / "dist").glob("*.whl")
    with tarfile.open(sdist) as archive:
        sdist_names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    with zipfile.ZipFile(wheel) as archive:
        wheel_names = set(archive.namelist())
    return output, sdist_names, wheel_names


def test_the_build_warns_nothing(built):
    output, _, _ = built
    warnings = [line for line in output.splitlines() if "warn" in line.lower()]
    assert not warnings, "\n".join(warnings)


def test_the_sdist_holds_the_sources_and_the_license(built):
    _, names, _ = built
    assert {"LICENSE", "README.md", "pyproject.toml", "export/__init__.py",
            "gpt2onnx/serving/static/playground.html"} <= names
    assert not any(name.startswith("tests/") for name in names), "a partial test suite in the sdist"


def test_the_wheel_holds_every_module_the_playground_the_export_step_and_the_license(built):
    _, _, names = built
    expected = {str(p.relative_to(REPO)) for p in (REPO / "gpt2onnx").rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {str(p.relative_to(REPO)) for p in (REPO / "gpt2onnx" / "serving" / "static").iterdir()}
    expected |= {"gpt2onnx_export/" + p.name for p in (REPO / "export").glob("*.py")}
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), sorted(names)
    assert not any(name.startswith(("tests/", "export/", "benchmarks/")) for name in names)
