"""Run a function in N gloo processes inside a test and get each rank's return value back.

    results = run_distributed(fn, 2, *args)   # fn(*args) runs on ranks 0 and 1

``fn`` must be importable (a module-level function of a test module). Each worker sets torchrun's
environment variables, so megarope.parallel.init() inside ``fn`` joins the group as usual.
"""

from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp

from megarope.parallel import free_port


def _worker(fn, rank, world, port, queue, args, kwargs):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    try:
        queue.put((rank, True, fn(*args, **kwargs)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        from megarope import parallel

        parallel.destroy()


def start_with_short_default_timeout(seconds: float) -> None:
    """Start this worker's default process group (before parallel.init, which then joins it) with a timeout of
    ``seconds``: a collective of the default group that waits longer fails, as NCCL's watchdog ends one that
    waits longer than its 10 minutes on GPUs. What megarope waits for on its host-side group does not."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=seconds))


def run_distributed(fn, world_size: int, *args, timeout: float = 600, **kwargs) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, queue, args, kwargs))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            (results.__setitem__(rank, value) if ok else errors.append(f"rank {rank}:\n{value}"))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
