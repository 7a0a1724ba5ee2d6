"""Peak memory of one piece of work in this process, read from the kernel (Linux only), and the fresh child
processes (gloo ranks) each measurement runs in.

``reset()`` zeroes the peak-RSS counter (``echo 5 > /proc/self/clear_refs`` sets VmHWM to VmRSS) and returns the
RSS then; ``added_mib(base_kb)`` is the peak since, minus that base: the memory the work itself added. torch's
CPU allocator has no peak counter of its own, and tracemalloc does not see tensors, so the kernel's is the one
that counts every allocation. Pin glibc's mmap threshold (eval_scaling.py says how) for it to follow live memory.
"""

from __future__ import annotations

import json
import os
import subprocess

from megarope.parallel import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def run_children(command: list[str], env: dict, ranks: int = 1, what: str = "") -> list[dict]:
    """Run ``command`` in ``ranks`` fresh processes (gloo ranks of one group when more than one) and return
    the JSON object each printed last; a failed child ends the benchmark with its stderr."""
    port = str(free_port())
    rank_env = [dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port) if ranks > 1 else env for r in range(ranks)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=e)
             for e in rank_env]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{what} failed:\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results
