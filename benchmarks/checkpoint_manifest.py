"""What a checkpoint's manifest costs: hashing a file against only reading it, per core.

Every save hashes what each rank wrote (checkpoint._seal) and every resume hashes it again
(checkpoint.verify_checkpoint), each rank its own share. This measures, on one core, reading a file
that is in the page cache (what a save's hashing reads: the rank's own files, just written) with
nothing done to the bytes, and with SHA-256 (files.sha256_file, what megarope uses), BLAKE2b and CRC32
(zlib) computed over them, as GB/s and as the ratio to the plain read.

    .venv/bin/python benchmarks/checkpoint_manifest.py [--mib 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import tempfile
import time
import zlib

from megarope.files import sha256_file

CHUNK = 1 << 18  # hashlib.file_digest's buffer


def read_only(path: str) -> None:
    buf = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def blake2b_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def crc32_file(path: str) -> int:
    crc, buf = 0, bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


def best_seconds(fn, path: str, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(path)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="file size in MiB")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many passes each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "shard.bin")
        with open(path, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        read_only(path)  # into the page cache
        size_gb = args.mib * (1 << 20) / 1e9
        base = best_seconds(read_only, path, args.rounds)
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.mib} MiB file in the "
              f"page cache, best of {args.rounds}")
        print(f"{'':10} {'GB/s':>6} {'x read':>7}")
        for name, fn in (("read", read_only), ("sha256", sha256_file), ("blake2b", blake2b_file),
                         ("crc32", crc32_file)):
            seconds = base if fn is read_only else best_seconds(fn, path, args.rounds)
            print(f"{name:10} {size_gb / seconds:6.2f} {seconds / base:7.2f}")


if __name__ == "__main__":
    main()
