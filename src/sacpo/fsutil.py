"""Durable directory replacement: every file fsynced before the rename, the parent directory after it.

A rename is atomic but not durable on its own: after a power loss the new name can point at files whose data
never reached the disk. `replace_dir(tmp, final)` is the directory version of write-temp-fsync-rename.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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


def replace_dir(tmp: Path, final: Path) -> None:
    """Make `tmp` durable, remove `final` if present, rename `tmp` to `final`, fsync the parent."""
    fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically and durably: temp file in the same directory, fsync, rename, fsync parent.

    Readers see the old file or the new one, never a partial write; the file gets normal permissions (umask).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    fsync_dir(p.parent)
    return p
