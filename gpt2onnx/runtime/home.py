"""Where `pipeline(model="gpt2")` finds a model named like a hub id: the local export home.

The runtime cannot download or export (that needs torch), so a name that is not a directory is looked up as
`$GPT2ONNX_HOME/NAME` (default `$XDG_DATA_HOME/gpt2onnx/models/NAME`, i.e. `~/.local/share/gpt2onnx/models/NAME`;
a hub id's `/` makes a subdirectory). When it is not there, the error gives the one command that puts it there.
Exports are data, not cache: the home is never inside the per-user cache (gpt2onnx/runtime/user_cache.py), which may
be deleted at any time.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from ..errors import ModelLoadError

HOME_VARIABLE = "GPT2ONNX_HOME"


def export_home() -> Path:
    """$GPT2ONNX_HOME, or $XDG_DATA_HOME/gpt2onnx/models (~/.local/share/gpt2onnx/models)."""
    home = os.environ.get(HOME_VARIABLE)
    if home:
        return Path(home).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data).expanduser() / "gpt2onnx" / "models"


def resolve_model(model: str | os.PathLike) -> Path:
    """An existing directory as it is; otherwise the export of that name in the export home."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    parts = Path(name).parts
    if path.is_absolute() or not parts or any(p in ("..", ".") for p in parts) or len(parts) > 2:
        raise ModelLoadError(f"model directory {name} does not exist",
                             hint="pass an exported model directory (gpt2onnx export MODEL OUT_DIR), or a hub id "
                                  f"exported into ${HOME_VARIABLE}")
    exported = export_home() / name
    if exported.is_dir():
        return exported
    command = f"gpt2onnx export {shlex.quote(name)} {shlex.quote(str(exported))}"
    raise ModelLoadError(f"{name} is neither a directory nor an export in {export_home()} "
                         "(gpt2onnx cannot download or export at run time)",
                         hint=f"export it once, where it will be found: {command}  "
                              f"(set ${HOME_VARIABLE} to use another directory)")
