"""Peak memory of one piece of work in this process, read from the kernel (Linux only).

``reset()`` zeroes the peak-RSS counter (``echo 5 > /proc/self/clear_refs`` sets VmHWM to VmRSS) and returns the
RSS then; ``added_mib(base_kb)`` is the peak since, minus that base: the memory the work itself added. torch's
CPU allocator has no peak counter of its own, and tracemalloc does not see tensors, so the kernel's is the one
that counts every allocation. Pin glibc's mmap threshold (eval_scaling.py says how) for it to follow live memory.
"""

from __future__ import annotations


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset() -> int:
    """Set the peak to the current RSS; return that RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kb("VmRSS")


def added_mib(base_kb: int) -> float:
    return (status_kb("VmHWM") - base_kb) / 1024
