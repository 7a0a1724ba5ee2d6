"""Run a function in N gloo processes inside a test and get each rank's return value back.

    results = run_distributed(fn, 2, *args)   # fn(*args) runs on ranks 0 and 1

``fn`` must be importable (a module-level function of a test module). Each worker sets torchrun's
environment variables, so megarope.parallel.init() inside ``fn`` joins the group as usual.

The workers are forked from a forkserver that imported megatron-core (and torch) once: a worker started by
spawn spends ~5 s of CPU importing them, the largest cost of the multi-process tests on a 2-core machine. The
server is a fresh interpreter, so a worker shares nothing with the test's process but what it is passed, as
under spawn; it takes the test's environment as it is at the call.
"""

from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp

from megarope.parallel import free_port


PRELOAD = ["megatron.core"]


def _worker(fn, rank, world, port, queue, environ, args, kwargs):
    os.environ.clear()
    os.environ.update(environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
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
    waits longer than its 10 minutes on GPUs. What megarope waits for on its host-side group does not.

    The ranks meet first on a store that waits as long as a start takes (on a busy machine one worker can start
    many seconds after another), so that only the collectives are held to ``seconds``."""
    from datetime import timedelta

    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=rank == 0,
                          timeout=timedelta(seconds=300), wait_for_workers=True)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=seconds))


def run_distributed(fn, world_size: int, *args, timeout: float = 600, **kwargs) -> list:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts: the first call of the session
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, queue, dict(os.environ), args, kwargs))
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
