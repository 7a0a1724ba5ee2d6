"""Atomic writes: a reader sees the old file (or directory) or the new one, never half of one.

Every file megarope writes for a user goes through here: JSON results and metadata, indexed
datasets, figures, converted and trained checkpoints. Each is written beside its final path under a
temporary name and renamed into place only when complete; on failure the temporary is removed.
And the digest that tells later whether a file is still what was written (sha256_file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
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


@contextlib.contextmanager
def atomic_files(paths: Sequence[str], mode: int | None = None) -> Iterator[list[str]]:
    """Yield a temporary name beside each path; on success move them all into place (with
    permissions ``mode`` less the umask, when given), on failure delete them."""
    temps = [f"{p}.tmp{os.getpid()}" for p in paths]
    try:
        yield temps
        for temp, path in zip(temps, paths):
            if mode is not None:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(temp, mode & ~umask)
            os.replace(temp, path)
    finally:
        for temp in temps:
            if os.path.exists(temp):
                os.remove(temp)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably (fsync of the file and its directory)."""
    with atomic_files([path]) as (tmp,):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def partial_dir(final_dir: str) -> str:
    """The hidden sibling a directory is built in before it is renamed to ``final_dir``."""
    final_dir = os.path.abspath(final_dir)
    return os.path.join(os.path.dirname(final_dir), f".{os.path.basename(final_dir)}.partial")


def replace_dir(tmp: str, final_dir: str) -> None:
    """Swap the finished directory ``tmp`` into place, replacing ``final_dir`` if it exists, without a
    moment of having none: the old one is moved aside first and deleted only after the rename."""
    old = None
    if os.path.exists(final_dir):
        old = f"{tmp}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp, final_dir)
    fsync_dir(os.path.dirname(os.path.abspath(final_dir)))
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final_dir: str) -> Iterator[str]:
    """Yield an empty temporary directory; on success it becomes ``final_dir``, on failure it is removed.

    For one process. A collective save (every rank writes into it) uses partial_dir/replace_dir with
    barriers around them (see megarope.checkpoint).
    """
    tmp = partial_dir(final_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        replace_dir(tmp, final_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str) -> str:
    """The SHA-256 of a file's contents, hex.

    Why SHA-256 rather than a faster checksum: with the CPU's SHA extensions it hashes about 1.4 GB/s
    per core (docs/benchmarks.md), 0.55x the speed of CRC32 but faster than BLAKE2b, it is in the
    standard library (hashlib, which releases the GIL while hashing), and unlike a 32-bit checksum it
    lets no damage through by chance, however the damage is patterned.
    """
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
