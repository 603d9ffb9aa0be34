"""One way to write files and folders atomically, for every writer in lora_fx (ONNX export, ONNX fold, adapter
files, PEFT adapter folders).

A save that fails or is killed must leave what was there before, byte for byte, and no half-written file a later
load could trust. Both helpers write into a temporary folder beside the target (same filesystem, so the final
rename is atomic) and only then put the result in the target's place:

* ``atomic_file(path)``: a context manager yielding the temporary folder; write ``tmp / path.name`` (and any
  companion files, e.g. an ONNX model's external ``.data``) there. On a clean exit the companions are moved next to
  `path` first and the main file last (it refers to them), each with ``os.replace``.
* ``atomic_write_dir(directory, write, owned)``: ``write(tmp)`` fills a temporary folder that then takes the
  folder's place in one step (an atomic directory exchange on Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import socket
import sys
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from lora_fx.errors import AdapterFileError, ExportError, LoraFxError

_TMP_TAG = "lora_fx-tmp"
_OLD_TAG = "lora_fx-old"


# ------------------------------------------------------------------------------------------------ atomic files
@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, error: type[LoraFxError] = ExportError) -> Iterator[Path]:
    """A temporary folder beside `path`; what the caller wrote there as ``tmp / path.name`` (plus companions) is
    moved into place when the block ends without an exception. The folder is removed whatever happens.

    Creating the folder up front is the real writability check (os.access says yes to root everywhere). Errors
    are raised as `error` with what, where and how to fix.
    """
    path = Path(path)
    parent = path.parent
    fix = "write to a path inside an existing, writable directory (create it first with os.makedirs)"
    if path.is_dir():
        raise error("the output path is a directory, not a file", where=str(path),
                    fix="give a file path such as 'model.onnx'")
    if not parent.is_dir():
        raise error("the output directory does not exist or is not a directory", where=str(parent), fix=fix)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    except OSError as err:
        raise error(f"the output directory is not writable: {err}", where=str(parent), fix=fix) from err
    try:
        yield tmp
        main = tmp / path.name
        try:
            for extra in sorted(p for p in tmp.iterdir() if p != main):  # companions first, the main file last
                os.replace(extra, parent / extra.name)
            os.replace(main, path)
        except OSError as err:
            raise error(f"the written file could not be moved into place: {err}", where=str(path),
                        fix="check free disk space and permissions of the output directory, then write again"
                        ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ atomic folders
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False where not supported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(target: Path) -> None:
    """Remove temporary folders that a killed save into `target` left (same host, process gone).

    A previous adapter moved aside by the non-Linux fallback is put back when `target` is missing."""
    host = socket.gethostname()
    prefix = f".{target.name}.{_TMP_TAG}-", f".{target.name}.{_OLD_TAG}-"
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        tag = next((p for p in prefix if entry.name.startswith(p)), None)
        if tag is None:
            continue
        parts = entry.name[len(tag):].split("-")  # host-pid-random (the host may contain '-')
        try:
            pid, entry_host = int(parts[-2]), "-".join(parts[:-2])
        except (ValueError, IndexError):
            continue
        if entry_host != host or _pid_alive(pid):
            continue
        if tag == prefix[1] and not target.exists():
            os.replace(entry, target)  # the previous adapter, moved aside by a save that was killed
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _temp_name(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.{tag}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write_dir(directory: str | os.PathLike, write: Callable[[Path], None], owned: Iterable[str]) -> Path:
    """Write a folder atomically: `write(tmp)` fills a temporary folder beside `directory`, which then replaces it.

    `owned` are the file names such a folder holds; an existing `directory` holding anything else is refused
    (replacing it would delete the user's other files). A symbolic link is followed: the folder it points to is
    replaced and the link stays (a link to nothing is refused). Everything that can be checked is checked before
    anything changes (a read-only parent or old folder is refused up front), so an error means nothing changed.
    Once the new folder has taken the old one's place the save has succeeded: a copy of the old folder that cannot
    be removed then is a warning naming it, not an error."""
    given = Path(directory).expanduser().absolute()
    if given.is_symlink() and not given.exists():
        raise AdapterFileError(f"the adapter path is a symbolic link to {os.readlink(given)!r}, which does not exist",
                               where=str(given), fix="point the link at an existing folder, or remove the link")
    target = Path(os.path.realpath(given))  # follows links, in `directory` and its parents
    owned = set(owned)
    if target.exists():
        if not target.is_dir():
            raise AdapterFileError("the adapter path exists and is not a folder", where=str(given),
                                   fix="give a folder path (it is created) or remove the file")
        others = sorted(p.name for p in target.iterdir() if p.name not in owned)
        if others:
            raise AdapterFileError(
                f"the folder exists and holds files that are not part of an adapter: {others[:10]}"
                + (" ..." if len(others) > 10 else ""),
                where=str(given), fix="save the adapter into its own folder (e.g. a new subfolder); a save "
                                      "replaces the whole folder so that it is atomic")
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # innermost first
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(created)
        raise AdapterFileError(f"cannot create the parent folder: {e}", where=str(target.parent),
                               fix="check the path and its permissions") from e
    # the parent gets the temporary folder; the old folder's files are deleted after the swap
    for folder in [target.parent] + ([target] if target.exists() else []):
        if not os.access(folder, os.W_OK | os.X_OK):
            _remove_empty(created)
            raise AdapterFileError(f"the folder {str(folder)!r} is not writable, so the adapter cannot be replaced "
                                   f"there; nothing was changed", where=str(given),
                                   fix="make it writable (chmod u+w) or save the adapter elsewhere")
    _clean_stale(target)
    tmp = _temp_name(target, _TMP_TAG)
    try:
        tmp.mkdir()
        write(tmp)
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        previous = _swap_in(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if isinstance(e, (AdapterFileError, KeyboardInterrupt, SystemExit)):
            raise
        raise AdapterFileError(f"saving failed, the previous content (if any) is unchanged: "
                               f"{type(e).__name__}: {e}", where=str(given),
                               fix="check free disk space and permissions, then save again") from e
    # the new folder is in place: the save has succeeded, whatever happens to the old copy
    if previous is not None:
        try:
            shutil.rmtree(previous)
        except OSError as e:
            warnings.warn(f"lora_fx: the adapter was saved to {target}, but the previous content, moved to "
                          f"{previous}, could not be removed ({e}); delete that folder by hand", stacklevel=3)
    _fsync_dir(target.parent)
    return given


def _swap_in(tmp: Path, target: Path) -> Path | None:
    """Put `tmp` in `target`'s place in one step; return where the previous content now is (None: there was none).
    Raises with the previous content in place."""
    if not target.exists():
        os.rename(tmp, target)
        return None
    if _exchange(tmp, target):
        return tmp  # tmp now holds the previous content
    # no atomic exchange here: move the old folder aside, put the new one in place
    old = _temp_name(target, _OLD_TAG)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


def _remove_empty(folders: list[Path]) -> None:
    """Remove the parent folders a failed save created (innermost first), if still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


