"""The documentation runs. Every shell and Python block of README.md and docs/getting-started.md carries a marker,
an HTML comment on the line before its fence (invisible on GitHub and on the MkDocs site):

    <!-- test: run -->                       run it; it must exit 0
    <!-- test: run expect="TEXT" -->         ... and print TEXT, on stdout or stderr (expect may be given
                                             several times)
    <!-- test: run background wait="URL" --> start it in the background (a server) and wait until URL answers
                                             200; it is stopped (SIGTERM to its process group) after the
                                             document's last block
    <!-- test: run skip-install -->          leave out its `pip install ...` steps, and check instead that
                                             this environment already holds what they install
    <!-- test: skip REASON -->               not run, and the reason says why

The runnable blocks of a document run in order, offline, in a fresh working directory (which holds a copy of
tests/data/gpt2-tiny-trained, as a checkout does), with this interpreter's bin directory first on PATH, so
`gpt2onnx` and `python` are the ones under test. Port 8000 in a document's blocks is replaced by a free port.
Then the site is built with `mkdocs build --strict`: a broken link, a missing page or an API docstring
mkdocstrings cannot read fails.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from helpers import REPO, TRAINED_DATA

DOCUMENTS = ("README.md", "docs/getting-started.md")
LANGUAGES = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python"}
FENCE = re.compile(r"^```(\w+)[^\n]*$")
MARKER = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->$")
BLOCK_TIMEOUT = 300  # seconds; exporting random:gpt2 takes ~20 s on a quiet 2-core machine
SERVER_START_TIMEOUT = 180


@dataclass
class Block:
    document: str
    line: int  # of the opening fence, 1-based
    language: str  # "shell" or "python"
    code: str
    marker: str | None  # the marker's text after "test:", None when there is none
    run: bool = False
    background: bool = False
    skip_install: bool = False
    expect: list[str] = field(default_factory=list)
    wait: str | None = None
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"


def parse_blocks(document: str) -> list[Block]:
    """Every fenced shell or Python block of a document, with its marker read."""
    lines = (REPO / document).read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{document}:{i + 1}: a fence that is never closed"
        language = LANGUAGES.get(fence.group(1))
        if language:
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = MARKER.match(before.strip())
            block = Block(document, i + 1, language, "\n".join(lines[i + 1:end]) + "\n",
                          marker.group(1) if marker else None)
            _read_marker(block)
            blocks.append(block)
        i = end + 1
    return blocks


def _read_marker(block: Block) -> None:
    if block.marker is None:
        return
    words = shlex.split(block.marker)
    if words[0] == "skip":
        block.reason = " ".join(words[1:])
        return
    assert words[0] == "run", f"{block.where}: a marker is 'run ...' or 'skip REASON', got {block.marker!r}"
    block.run = True
    for word in words[1:]:
        key, _, value = word.partition("=")
        if key == "background":
            block.background = True
        elif key == "skip-install":
            block.skip_install = True
        elif key == "expect" and value:
            block.expect.append(value)
        elif key == "wait" and value:
            block.wait = value
        else:
            raise AssertionError(f"{block.where}: unknown marker option {word!r}")
    assert not block.background or block.wait, f"{block.where}: a background block needs wait=URL"


# --- what the markers promise ------------------------------------------------------------------------------


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_shell_and_python_block_is_marked(document):
    """No block is left out silently: each one runs, or says why it does not."""
    blocks = parse_blocks(document)
    unmarked = [block.where for block in blocks if block.marker is None]
    assert unmarked == [], "add <!-- test: run --> or <!-- test: skip REASON --> before these blocks"
    assert all(block.run or block.reason for block in blocks), "a skipped block must say why"
    assert sum(block.run for block in blocks) >= 4, "the document's examples are meant to run"


def test_the_markers_are_read():
    """The parser finds what README.md's set-up block says (a parser that read nothing would pass the rest)."""
    setup = parse_blocks("README.md")[0]
    assert setup.run and setup.skip_install and setup.language == "shell"
    assert setup.code.startswith("pip install torch==2.13.0 && pip install '.[export]' && gpt2onnx export")
    assert setup.expect == ["Hello, I'm a language model,"]
    server = next(block for block in parse_blocks("README.md") if block.background)
    assert "gpt2onnx serve" in server.code and server.wait.endswith("/health")


def test_readme_stays_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300


def test_the_documents_name_no_tool_the_project_does_not_ship():
    banned = ["farm" + "-bench", "farm" + "-studio"]  # spelled apart, so this file does not name them either
    files = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "benchmarks").rglob("*.md"))]
    found = [f"{path.relative_to(REPO)}: {name}" for path in files for name in banned
             if name in path.read_text(encoding="utf-8")]
    assert found == []


# --- running them --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _with_port(text: str, port: int) -> str:
    return re.sub(r"(?<=:)8000\b|(?<=--port )8000\b", str(port), text)


def _installed(requirement: Requirement, seen: set[str]) -> list[str]:
    """What is missing from this environment for `requirement` (extras of gpt2onnx followed)."""
    name = requirement.name.lower()
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return [str(requirement)]
    missing = [] if requirement.specifier.contains(version, prereleases=True) else [f"{requirement} (have {version})"]
    for extra in sorted(requirement.extras - seen):
        seen.add(extra)
        for line in importlib.metadata.requires(name) or []:
            needed = Requirement(line)
            if needed.marker is not None and needed.marker.evaluate({"extra": extra}):
                needed.marker = None
                missing += _installed(needed, seen)
    return missing


def _check_install_step(step: str, where: str) -> None:
    """A `pip install` step the test leaves out: this environment must already hold what it installs."""
    words = shlex.split(step)
    assert words[:2] == ["pip", "install"], f"{where}: only pip install steps may be left out, got {step!r}"
    for word in words[2:]:
        assert not word.startswith("-"), f"{where}: pip options are not understood here: {word}"
        requirement = Requirement("gpt2onnx" + word[1:] if word.startswith(".") else word)
        missing = _installed(requirement, set())
        assert missing == [], f"{where}: {step!r} would install what this environment lacks: {missing}"


def _runnable(block: Block, port: int) -> str:
    code = _with_port(block.code, port)
    if not block.skip_install or block.language != "shell":
        return code
    kept = []
    for line in code.splitlines():
        steps = line.split(" && ")
        left = [s for s in steps if s.strip().startswith("pip install")]
        for step in left:
            _check_install_step(step.split("#")[0].strip(), block.where)
        kept.append(" && ".join(s for s in steps if s not in left))
    assert any(line.strip() for line in kept), f"{block.where}: nothing left to run once pip install is left out"
    return "\n".join(kept) + "\n"


def _command(block: Block, code: str) -> list[str]:
    if block.language == "python":
        return [sys.executable, "-c", code]
    return ["bash", "-e", "-o", "pipefail", "-c", code]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONPATH", None)
    return env


def _wait_until_up(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the background block exited ({server.returncode}) before {url} answered:\n"
                        f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer 200 within {SERVER_START_TIMEOUT} s:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the process group this test started (the server drains and exits), then SIGKILL if needed."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_the_documents_blocks_run(document, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(TRAINED_DATA, work / "tests" / "data" / "gpt2-tiny-trained")
    port, env, servers = _free_port(), _environment(), []
    ran = 0
    try:
        for block in parse_blocks(document):
            if not block.run:
                continue
            code = _runnable(block, port)
            if block.background:
                log = tmp_path / f"background-{block.line}.log"
                with log.open("wb") as out:
                    servers.append(subprocess.Popen(_command(block, code), cwd=work, env=env, stdout=out,
                                                    stderr=subprocess.STDOUT, start_new_session=True))
                _wait_until_up(_with_port(block.wait, port), servers[-1], log)
            else:
                done = subprocess.run(_command(block, code), cwd=work, env=env, capture_output=True, text=True,
                                      timeout=BLOCK_TIMEOUT)
                shown = f"{block.where}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
                assert done.returncode == 0, shown
                for text in block.expect:
                    assert text in done.stdout + done.stderr, f"expected {text!r} in the output of {shown}"
            ran += 1
        assert ran >= 4
        for server in servers:
            assert server.poll() is None, "a background server stopped while the blocks ran"
    finally:
        for server in servers:
            _stop(server)
    # a server drains on SIGTERM and exits 0 (gpt2onnx/serving/server.py)
    assert [server.returncode for server in servers] == [0] * len(servers)


def test_the_site_builds_strictly(tmp_path):
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.skip("mkdocs is not installed: pip install '.[docs]' (the test extra includes it)")
    site = tmp_path / "site"
    env = _environment() | {"NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    reference = (site / "reference" / "index.html").read_text(encoding="utf-8")
    for name in ("GenerationSettings", "EngineOptions", "set_seed", "VerificationError"):
        assert name in reference, f"the API reference lacks {name}"
    for page in (REPO / "benchmarks" / "results").glob("*.md"):  # published by docs/tools/results_pages.py
        assert (site / "results" / page.stem / "index.html").is_file(), page.name
