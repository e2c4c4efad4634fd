"""The manifest of an exported model: what it is, where it came from, and the sha256 of every file."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..errors import ModelLoadError
from ..format import contract as c
from ..format.graph_facts import check_claims, read_graph_facts
from . import user_cache

_CHUNK = 1 << 22
_SHA256 = re.compile(r"[0-9a-f]{64}")
# files the runtime reads: the manifest must list (and so hash) them
REQUIRED_FILES = (c.MODEL_FILE, c.CONFIG_FILE, c.TOKENIZER_FILE)
OPTIONAL_FILES = (c.GENERATION_CONFIG_FILE,)  # read when present, so hashed when present
_REEXPORT = "export the model again, or copy the directory again from a good source"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(Path(directory) / name) for name in sorted(names)}


def write_manifest(directory: Path, manifest: dict) -> None:
    path = Path(directory) / c.MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(directory: Path, *, check_hashes: bool = True) -> dict:
    """Read and check a model directory's manifest: its files (plain names inside the directory), their
    sha256 (unless check_hashes=False; a file that matched once and is unchanged since, by size, mtime, ctime
    and inode, is not hashed again: gpt2onnx/runtime/user_cache.py) and its claims against the graph itself
    (precision, quantization, KV cache dtype; always, see graph_facts). Raises ModelLoadError naming what is
    wrong."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ModelLoadError(f"{directory} is a file, not a model directory",
                             hint="pass the directory an export wrote (the one holding manifest.json and model.onnx)")
    if not directory.is_dir():
        raise ModelLoadError(
            f"model directory {directory} does not exist",
            hint="export one first: gpt2onnx export gpt2 DIR (or random:tiny offline)",
        )
    path = directory / c.MANIFEST_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{directory} has no {c.MANIFEST_FILE}: it is not a finished gpt2onnx export",
            hint="an interrupted or failed export leaves no manifest; export again (with --force to overwrite)",
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: invalid JSON or UTF-8
        raise ModelLoadError(f"{path} is not valid JSON: {error}", hint=_REEXPORT) from error
    if not isinstance(manifest, dict) or manifest.get(c.M_FORMAT) != c.FORMAT_NAME:
        raise ModelLoadError(f"{path} is not a {c.FORMAT_NAME} manifest", hint=_REEXPORT)
    version = manifest.get(c.M_FORMAT_VERSION)
    if version not in c.SUPPORTED_FORMAT_VERSIONS:
        raise ModelLoadError(
            f"{path} has format_version {version!r}; this gpt2onnx reads "
            f"{', '.join(map(str, c.SUPPORTED_FORMAT_VERSIONS))}",
            hint="upgrade gpt2onnx, or export the model again with this version",
        )
    files = manifest.get(c.M_FILES)
    if not isinstance(files, dict) or c.MODEL_FILE not in files:
        raise ModelLoadError(f"{path} lists no files", hint=_REEXPORT)
    records, verified = user_cache.records() if check_hashes else {}, {}
    for name, expected in files.items():
        file = member(directory, name)
        if not isinstance(expected, str) or not _SHA256.fullmatch(expected):
            raise ModelLoadError(f"{path} gives {name} the sha256 {expected!r}, which is not 64 hex digits",
                                 hint=_REEXPORT)
        if not file.is_file():
            raise ModelLoadError(
                f"{directory} lacks {name}, which its manifest lists",
                hint="the directory is incomplete; copy it again or export again",
            )
        # a file unchanged since it last matched is not hashed again
        if check_hashes and user_cache.known_sha256(file, records) != expected:
            stat = user_cache.stat_key(file)  # before hashing: a write during the hash changes it
            if sha256_file(file) != expected:
                raise ModelLoadError(
                    f"{file} does not match the sha256 in the manifest: the file was changed or damaged",
                    hint=_REEXPORT,
                )
            verified[file] = (stat, expected)
    unlisted = [n for n in REQUIRED_FILES if n not in files]
    unlisted += [n for n in OPTIONAL_FILES if n not in files and (directory / n).exists()]
    if unlisted:
        raise ModelLoadError(f"{path} does not list {', '.join(unlisted)}, so nothing checks "
                             f"{'its' if len(unlisted) == 1 else 'their'} sha256", hint=_REEXPORT)
    check_claims(manifest, read_graph_facts(directory / c.MODEL_FILE), directory)
    user_cache.remember(verified)
    return manifest


def member(directory: Path, name) -> Path:
    """The file `name` of a model directory: a plain file name that stays inside it, or a ModelLoadError.

    The manifest is not hashed, so its file names are untrusted: `../../x` or `/etc/hostname` would
    otherwise be read and hashed (and their hash reported)."""
    plain = (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
             and "\0" not in name and not os.path.isabs(name))
    if not plain:
        raise ModelLoadError(f"{Path(directory) / c.MANIFEST_FILE} lists the file {name!r}, which is not a plain "
                             "file name", hint="a manifest names files inside its own directory only; " + _REEXPORT)
    file = Path(directory) / name
    try:
        inside = file.resolve().parent == Path(directory).resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop
        raise ModelLoadError(f"cannot resolve {file}: {error}", hint=_REEXPORT) from error
    if not inside:
        raise ModelLoadError(f"{file} leads outside its model directory (a symbolic link to {file.resolve()})",
                             hint="copy the real file into the model directory, or " + _REEXPORT)
    return file
