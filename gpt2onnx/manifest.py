"""The manifest of an exported model: what it is, where it came from, and the sha256 of every file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import contract as c
from .errors import ModelLoadError

_CHUNK = 1 << 22


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
    """Read and check a model directory's manifest. Raises ModelLoadError naming what is wrong."""
    directory = Path(directory)
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
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get(c.M_FORMAT) != c.FORMAT_NAME:
        raise ModelLoadError(f"{path} is not a {c.FORMAT_NAME} manifest")
    version = manifest.get(c.M_FORMAT_VERSION)
    if version not in c.SUPPORTED_FORMAT_VERSIONS:
        raise ModelLoadError(
            f"{path} has format_version {version!r}; this gpt2onnx reads "
            f"{', '.join(map(str, c.SUPPORTED_FORMAT_VERSIONS))}",
            hint="upgrade gpt2onnx, or export the model again with this version",
        )
    files = manifest.get(c.M_FILES)
    if not isinstance(files, dict) or c.MODEL_FILE not in files:
        raise ModelLoadError(f"{path} lists no files")
    for name, expected in files.items():
        file = directory / name
        if not file.is_file():
            raise ModelLoadError(
                f"{directory} lacks {name}, which its manifest lists",
                hint="the directory is incomplete; copy it again or export again",
            )
        if check_hashes and sha256_file(file) != expected:
            raise ModelLoadError(
                f"{file} does not match the sha256 in the manifest: the file was changed or damaged",
                hint="export the model again, or copy the directory again from a good source",
            )
    return manifest
