"""The only writer of files and directories: temp + fsync + rename, never a window without the old output.

A rename is atomic but not durable on its own: after a power loss the new name can point at files whose data
never reached the disk. Every writer here fsyncs the data before the rename and the parent directory after it.

    atomic_write_text(path, text)            text file (also _bytes, _json, _jsonl)
    with atomic_dir(out) as tmp:             build a directory in `tmp`; on success it replaces `out`
        save_file(tensors, tmp / "x.safetensors")
    replace_dir(tmp, final)                  the directory version of write-temp-fsync-rename

Replacing a directory: the new tree is made durable, then swapped with the old one in one atomic step
(`renameat2(RENAME_EXCHANGE)` on Linux), and only then is the old tree deleted: a reader sees the old output or the
new one at every moment, and a crash leaves one of the two complete at `final`. Where the exchange is not
available the old tree is renamed aside (`.<name>.old<pid>`) and the new one renamed in: a window of two renames
in which `final` is absent (a crash there leaves the old tree under its aside name).
Files get normal permissions (0666 & ~umask) whatever the library that wrote them chose (safetensors writes
0600 through its memory map).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_modes(path: Path) -> None:
    """Files under `path` (or `path` itself) → 0666 & ~umask, directories → 0777 & ~umask."""
    mask = _umask()
    if path.is_file():
        os.chmod(path, 0o666 & ~mask)
        return
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)


def fsync_tree(path: Path) -> None:
    """fsync every regular file under `path`, then every directory (deepest first)."""
    dirs = []
    for root, _, files in os.walk(path):
        dirs.append(root)
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        fsync_dir(Path(d))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h: atomically swap two existing paths


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(a, b, RENAME_EXCHANGE): swap two paths in one atomic step; False where the OS or the filesystem
    cannot (not Linux, glibc < 2.28, a filesystem without the flag)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Make `tmp` durable with normal modes and put it at `final` (see the module docstring): swapped in atomically
    where the OS can (Linux renameat2), else the old tree is renamed aside first. Returns `final`."""
    tmp, final = Path(tmp), Path(final)
    normal_modes(tmp)
    fsync_tree(tmp)
    if final.exists() and _exchange(tmp, final):
        fsync_dir(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # the old tree, now at the temporary name
        return final
    aside = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return final


def temp_dir_for(final: str | Path) -> Path:
    """A fresh, empty sibling directory of `final` to build a replacement in."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block succeeds it replaces `final` (`replace_dir`), when it
    raises the temporary directory is removed and `final` is untouched."""
    tmp = temp_dir_for(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write a file atomically and durably: temp file in the same directory, fsync, rename, fsync parent.

    Readers see the old file or the new one, never a partial write; the file gets normal permissions (umask).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, p)
    fsync_dir(p.parent)
    return p


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2, **kwargs: Any) -> Path:
    """`atomic_write_text` of json.dumps(data, indent=indent, **kwargs) with a trailing newline."""
    return atomic_write_text(path, json.dumps(data, indent=indent, **kwargs) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[Any], **kwargs: Any) -> Path:
    """`atomic_write_text` of one json.dumps(row, ensure_ascii=False, **kwargs) per line."""
    kwargs.setdefault("ensure_ascii", False)
    return atomic_write_text(path, "".join(json.dumps(r, **kwargs) + "\n" for r in rows))


def atomic_save_file(
    tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """safetensors `save_file` to a temp file in the same directory (streamed to disk, no second copy of the
    tensors in memory), fsync, normal file mode (not safetensors' 0600), rename, fsync the parent."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)
    return p
