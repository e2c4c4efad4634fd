"""Where an export is written: a hidden directory beside OUT_DIR, renamed into place when it is finished.

`.OUT.partial-PID@HOST-XXXXXXXX` holds the export while it is built and verified, and the export's scratch
files too (`gpt2onnx-work-*` inside it), so an interrupted export leaves one thing behind, never a loadable
model. Ctrl-C and SIGTERM (`terminate_cleanly`) remove it on the way out. A kill -9 cannot, so the next
export to the same OUT_DIR removes the partial directories whose process is gone (`remove_stale`), and
says so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from gpt2onnx.errors import ExportError
from gpt2onnx.format import contract as c

PARTIAL_MARK = ".partial-"
OLD_MARK = ".old-"  # an earlier export, swapped out while its replacement is renamed into place
WORK_PREFIX = "gpt2onnx-work-"
SHOWN_EXTRA = 5  # unlisted files named when --force refuses to replace an export
# errno values that mean the output location is at fault (full, read-only, not a directory, ...)
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM,
                  errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG}
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def check_output(out: Path, *, force: bool) -> Path:
    """OUT_DIR as an absolute path, its parent created. Refuses to overwrite without `force`, and never
    replaces something that is not an export of ours, nor an export holding files its manifest does not
    list (replacing would delete them)."""
    out = Path(out).expanduser().absolute()
    blocker = next((p for p in reversed(out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ExportError(f"cannot create {out}: {blocker} is a file, not a directory",
                          hint="choose an OUT_DIR whose parents are directories")
    if out.exists() or out.is_symlink():
        if not force:
            raise ExportError(f"{out} already exists", hint="pass --force to replace it, or choose another OUT_DIR")
        listed = _listed_files(out) if out.is_dir() else None
        if listed is None and not (out.is_dir() and not any(out.iterdir())):
            raise ExportError(f"{out} exists and is not a gpt2onnx export; refusing to replace it even with --force",
                              hint="choose another OUT_DIR or remove it yourself")
        extra = sorted(p.name for p in out.iterdir() if p.name not in (listed or set()))
        if extra:
            shown = ", ".join(extra[:SHOWN_EXTRA]) + (f" and {len(extra) - SHOWN_EXTRA} more"
                                                      if len(extra) > SHOWN_EXTRA else "")
            raise ExportError(f"{out} is an export but also holds {len(extra)} file(s) its manifest does not list "
                              f"({shown}); --force would delete them",
                              hint="move them out of OUT_DIR first, or choose another OUT_DIR")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(error, out) from error
    return out


def _listed_files(path: Path) -> set[str] | None:
    """The file names an export's manifest lists (and the manifest itself); None if `path` is no export."""
    try:
        manifest = json.loads((path / c.MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get(c.M_FORMAT) != c.FORMAT_NAME:
        return None
    files = manifest.get(c.M_FILES)
    return {*files, c.MANIFEST_FILE} if isinstance(files, dict) else None


def make_staging(out: Path) -> Path:
    """Create the hidden directory beside `out` the export is written to; its name holds this process's id."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL_MARK}{os.getpid()}@{_HOST}-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the published model is not
    except OSError as error:  # without the would-be directory's random name
        raise output_error(OSError(error.errno, error.strerror), out) from error
    return staging


def make_workdir(staging: Path) -> Path:
    """Scratch space for the export (tokenizer files, ...), inside the staging directory so that a killed
    export leaves one directory behind, not two; removed before publishing."""
    return Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=staging))


def remove_stale(out: Path, progress: Callable[[str], None]) -> list[Path]:
    """Remove what earlier exports to `out` left behind when their process was killed (kill -9, power
    loss): partial directories of processes on this host that no longer run. Mentions the ones left alone.
    Returns the removed paths."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(?:(\d+)@(.*)-)?[a-z0-9_]+$")
    try:
        candidates = sorted(p for p in out.parent.iterdir() if pattern.match(p.name))
    except OSError:
        return []
    removed = []
    for path in candidates:
        if path.is_symlink() or not path.is_dir():
            continue
        kind, pid, host = pattern.match(path.name).groups()
        if pid is None:
            progress(f"left alone: {path} (an unfinished export of unknown origin; remove it if no export to "
                     f"{out} is running)")
        elif host != _HOST:
            progress(f"left alone: {path} (an unfinished export by process {pid} on host {host}, which cannot be "
                     f"checked from here)")
        elif _alive(int(pid)):
            progress(f"left alone: {path} (an export by process {pid}, which is still running)")
        elif kind == "old" and not out.exists():
            progress(f"left alone: {path} holds the export that was at {out} when process {pid} was killed while "
                     f"replacing it; move {path / 'model'} back to {out} to keep it")
        else:
            size = _size(path)
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                progress(f"could not remove {path}, left by an export that was killed (process {pid}); "
                         f"remove it yourself")
            else:
                removed.append(path)
                progress(f"removed {path} ({size / 1e6:.1f} MB), left by an export that was killed "
                         f"(process {pid} no longer runs)")
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (in doubt: yes, so nothing in use is removed)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def _size(path: Path) -> int:
    total = 0
    for file in path.rglob("*"):
        with contextlib.suppress(OSError):
            if file.is_file() and not file.is_symlink():
                total += file.stat().st_size
    return total


def publish(staging: Path, out: Path) -> None:
    """Move the finished export into place; an existing export is swapped out and then removed."""
    if not out.exists():
        os.rename(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}{OLD_MARK}{os.getpid()}@{_HOST}-", dir=out.parent))
    os.rename(out, old / "model")
    try:
        os.rename(staging, out)
    except BaseException:  # an OSError, or SIGTERM / Ctrl-C between the two renames
        if not out.exists():
            os.rename(old / "model", out)  # put the earlier export back
        raise
    # only once the new export is in place is the earlier one deleted (if the process dies before, the next
    # export finds `old` as a stale directory of a dead process and removes it)
    shutil.rmtree(old, ignore_errors=True)


def output_error(error: OSError, out: Path, staging: Path | None = None) -> ExportError:
    """An OSError met while exporting to `out`, as one line naming the path (no traceback)."""
    reason = error.strerror or str(error) or type(error).__name__
    filename = Path(error.filename) if error.filename else None
    inside_staging = staging is not None and filename is not None and (filename == staging
                                                                        or staging in filename.parents)
    # the output's own paths; an unreadable source file is not the output's fault, whatever its errno
    ours = filename is not None and (filename == out or filename in out.parents or filename.parent == out.parent
                                     or inside_staging)
    if ours or (filename is None and error.errno in _OUTPUT_ERRNOS):
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            hint = "free space on that disk, or choose an OUT_DIR on another one"
        else:
            hint = "choose an OUT_DIR you can write to"
        detail = f" ({filename})" if filename is not None and filename != out and not inside_staging else ""
        return ExportError(f"cannot write the export to {out}: {reason}{detail}", hint=hint)
    return ExportError(f"the export failed: {reason}" + (f" ({filename})" if filename else ""),
                       hint="check the path named and try again")


class Terminated(SystemExit):
    """SIGTERM arrived during an export: raised in the main thread so that cleanup runs (exit status 143)."""


@contextlib.contextmanager
def terminate_cleanly():
    """While the block runs, SIGTERM raises Terminated instead of ending the process on the spot, so the
    finally-blocks remove the unfinished export (as Ctrl-C's KeyboardInterrupt does). Only in the main thread,
    and only where SIGTERM has its default action (an application's own handler is left alone); a second
    SIGTERM during the cleanup is ignored. The default action is restored afterwards."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
        raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
