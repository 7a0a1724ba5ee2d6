"""Peak memory of one piece of work in this process, read from the kernel (Linux only), and the fresh child
processes (gloo ranks) each measurement runs in.

``reset()`` zeroes the peak-RSS counter (``echo 5 > /proc/self/clear_refs`` sets VmHWM to VmRSS) and returns the
RSS then; ``added_mib(base_kb)`` is the peak since, minus that base: the memory the work itself added. torch's
CPU allocator has no peak counter of its own, and tracemalloc does not see tensors, so the kernel's is the one
that counts every allocation. Pin glibc's mmap threshold (eval_scaling.py says how) for it to follow live memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time

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


def run_children(command: list[str], env: dict, ranks: int = 1, what: str = "", rank_env=None,
                 timeout: float | None = None) -> list[dict]:
    """Run ``command`` in ``ranks`` fresh processes (the ranks of one group when more than one; ``rank_env(r)``
    adds variables of rank r's own) and return the JSON object each printed last (the last line that is one: a
    library may print after it as the process ends). A failed child, or children
    still running after ``timeout`` seconds (then all are killed), end the benchmark with the stderr of one.
    Their output goes to files, so that no child waits on a full pipe while another one is read."""
    port = str(free_port())
    envs = [dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port, **(rank_env(r) if rank_env else {})) if ranks > 1 else env for r in range(ranks)]
    with contextlib.ExitStack() as files:
        outputs = [[files.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2)] for _ in envs]  # out, err
        procs = [subprocess.Popen(command, stdout=out, stderr=err, text=True, cwd=REPO, env=e)
                 for e, (out, err) in zip(envs, outputs)]
        deadline = time.monotonic() + timeout if timeout else None
        try:
            for proc in procs:
                proc.wait(timeout=None if deadline is None else max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for proc in procs:
                proc.kill()
                proc.wait()
        for f in (f for pair in outputs for f in pair):
            f.seek(0)
        texts = [(out.read(), err.read()) for out, err in outputs]
    results = []
    for proc, (stdout, stderr) in zip(procs, texts):
        if proc.returncode:
            late = f" (still running after {timeout:.0f} s)" if proc.returncode == -signal.SIGKILL and timeout else ""
            raise SystemExit(f"{what} failed{late}:\n{stderr[-3000:]}")
        results.append(json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{"))))
    return results
