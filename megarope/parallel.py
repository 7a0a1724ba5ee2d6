"""Process groups and devices: torch.distributed plus megatron's parallel state (TP, CP, DP, PP).

Rank and world size come from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or from Slurm
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID); a plain process is a world of one.
NCCL on GPUs, gloo on CPUs; ``MEGAROPE_DEVICE=cpu`` keeps to the CPU where a GPU exists (compat.py).

The CP layout lives here too: megatron splits each sequence into 2*CP chunks and gives CP rank r
the chunks r and 2*CP-1-r (so causal attention costs every rank the same).
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.utils import get_batch_on_this_cp_rank

from megarope import compat
from megarope.errors import UsageError


# Waits around rank-0 file work (preparing data, writing and deleting checkpoints) and the agreement
# on errors go over a gloo group of all ranks with this timeout. On GPUs the training collectives use
# NCCL, whose watchdog ends the job when one stays open past the process group's timeout (10 minutes
# by default); deleting an old 70B checkpoint on a network file system can take longer than that. A
# long NCCL timeout would hide real hangs for as long, so the file waits get their own host-side group
# instead, and NCCL keeps its default.
FILE_WAIT_TIMEOUT = timedelta(hours=2)
_file_group = None


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    pp: int
    dp: int
    world: int
    rank: int
    vpp: int | None = None

    def describe(self) -> str:
        stages = f"PP {self.pp}" + (f" (x {self.vpp} virtual stages)" if self.vpp else "")
        return f"world {self.world} = TP {self.tp} x CP {self.cp} x {stages} x DP {self.dp}"


def _env_rank_world() -> tuple[int, int, int]:
    if "RANK" in os.environ:  # torchrun
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:  # srun, one task per device
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def cuda_device(local_rank: int, visible: int) -> int:
    """The CUDA device of the process with node-local rank ``local_rank`` that sees ``visible`` devices: its local
    rank where every process sees all of the node's GPUs (torchrun; srun without GPU binding), device 0 where it
    sees one (srun --gpus-per-task=1 or --gpu-bind gives each task its own GPU as device 0; ranks that share a GPU)."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise UsageError(f"local rank {local_rank} has no GPU of its own: this process sees {visible} GPUs "
                         f"(bind one GPU to each task, or start as many ranks per node as it has GPUs)")
    return local_rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if compat.uses_cuda() else torch.device("cpu")


def check_sizes(world: int, tp: int, cp: int, pp: int = 1) -> None:
    for name, size in (("tp", tp), ("cp", cp), ("pp", pp)):
        if size < 1:
            raise UsageError(f"parallel.{name} must be >= 1, got {size}")
    if world % (tp * cp * pp):
        raise UsageError(f"world size {world} is not divisible by TP*CP*PP = {tp}*{cp}*{pp}")


def init(tp: int = 1, cp: int = 1, pp: int = 1, seed: int = 1234, vpp: int | None = None) -> Layout:
    """Start torch.distributed (if needed) and megatron's parallel state; seed every RNG.

    ``vpp``: virtual pipeline stages per pipeline rank (megatron's interleaved schedule), or None.
    """
    global _file_group
    compat.apply()
    if not dist.is_initialized():
        rank, world, local_rank = _env_rank_world()
        check_sizes(world, tp, cp, pp)
        # A world of one needs no launcher; its own port, not the environment's, so that child
        # processes started later do not inherit an address already in use.
        init_method = f"tcp://127.0.0.1:{free_port()}" if world == 1 and "MASTER_PORT" not in os.environ else None
        if world > 1 and "MASTER_PORT" not in os.environ:  # srun without torchrun: the ranks meet at env://
            raise UsageError("MASTER_ADDR is set but MASTER_PORT is not: set both to where the ranks meet "
                             "(or start them with torchrun)")
        if compat.uses_cuda():
            torch.cuda.set_device(cuda_device(local_rank, torch.cuda.device_count()))
        dist.init_process_group("nccl" if compat.uses_cuda() else "gloo", init_method=init_method,
                                rank=rank, world_size=world)
    world = dist.get_world_size()
    check_sizes(world, tp, cp, pp)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp)
    if _file_group is None:
        _file_group = dist.new_group(backend="gloo", timeout=FILE_WAIT_TIMEOUT)
    seed_everything(seed)
    return Layout(tp, cp, pp, world // (tp * cp * pp), world, dist.get_rank(), vpp)


def ensure(tp: int | None = None, cp: int | None = None) -> bool:
    """The parallel state a library call needs: TP x CP (default 1 x 1) through init -- a world of one in a
    plain process -- unless one exists, which must then have the sizes asked for. True when this call set it
    up: the caller ends it with destroy() once done with what it built (a model keeps using it)."""
    if parallel_state.model_parallel_is_initialized():
        have = (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_context_parallel_world_size())
        want = (tp or have[0], cp or have[1])
        if have != want:
            raise UsageError(f"parallel state is TP {have[0]} x CP {have[1]}, asked for TP {want[0]} x CP {want[1]}")
        return False
    init(tp=tp or 1, cp=cp or 1)
    return True


def seed_everything(seed: int) -> None:
    """Seed this rank's generators (after megatron's parallel state is set up).

    On a CPU every rank takes ``seed``: weights are built whole there and then split (model.build_model),
    so every layout starts from the same parameters. On GPUs each rank draws its own shard on the GPU, and
    the seeds are those of megatron's own training (megatron/training/initialize.py, _set_random_seed):
    pipeline stage p takes seed + 100 p, so that later stages do not repeat the first stage's draws, and
    megatron's tracker gives each TP rank its own stream. A start from random weights then depends on the
    layout; runs that compare layouts start from one checkpoint (init.from)."""
    if compat.uses_cuda():
        if parallel_state.model_parallel_is_initialized():
            seed += 100 * parallel_state.get_pipeline_model_parallel_rank()
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        torch.manual_seed(seed)
        # megatron forks a CUDA generator around dropout in TP regions; LLaMA has no dropout and a
        # CPU has no CUDA generator, so use megatron's tracker whose fork is a no-op.
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def destroy() -> None:
    global _file_group
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _file_group = None


def wait_for_all() -> None:
    """A barrier of all ranks that may wait long: on the host-side group (see FILE_WAIT_TIMEOUT)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=_file_group)


@contextlib.contextmanager
def fail_together():
    """Every rank raises when any rank fails inside the block, so that none waits forever in a collective.

        with parallel.fail_together():
            check_what_this_rank_can_see()

    The rank that failed raises its own error; the others raise UsageError when it was bad input,
    RuntimeError otherwise. One all-reduce on the host-side group (it may follow long rank-0 work).
    """
    failed = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
        failed = e
    code = torch.tensor([0 if failed is None else 1 if isinstance(failed, UsageError) else 2], dtype=torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(code, op=dist.ReduceOp.MAX, group=_file_group)
    if failed is not None:
        raise failed
    if code.item() == 1:
        raise UsageError("another rank stopped on bad input (see its message)")
    if code.item() == 2:
        raise RuntimeError("another rank failed (see its error)")


@contextlib.contextmanager
def as_world_of_one():
    """Library code inside the block sees no process group (torch.distributed.is_initialized() is False), so it
    takes its world-of-one path on this rank alone. Only for work that makes no collective call: megatron's
    dataset build on rank 0, which would otherwise wait for the others in a barrier (data.build_gpt_dataset)."""
    is_initialized = dist.is_initialized
    dist.is_initialized = lambda: False
    try:
        yield
    finally:
        dist.is_initialized = is_initialized


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank: one all-reduce on the host-side group, which every rank must
    call the same number of times (so that all of them, e.g., stop at the same point on a signal)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_file_group)
    return bool(value.item())


def cp_group():
    return parallel_state.get_context_parallel_group()


def cp_chunk_ids(cp_size: int, cp_rank: int) -> list[int]:
    """The two of the 2*CP sequence chunks that CP rank ``cp_rank`` holds."""
    return [cp_rank, 2 * cp_size - 1 - cp_rank]


def cp_local_positions(global_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global (0-based) positions of the tokens that this CP rank holds, in local order."""
    if global_len % (2 * cp_size):
        raise ValueError(f"sequence length {global_len} is not divisible by 2*CP = {2 * cp_size}")
    chunk = global_len // (2 * cp_size)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in cp_chunk_ids(cp_size, cp_rank)])


def slice_for_cp(batch: dict) -> dict:
    """Keep this CP rank's two chunks of every [batch, seq] tensor (megatron's load-balanced order)."""
    return get_batch_on_this_cp_rank(dict(batch), is_hybrid_cp=False, cp_group=cp_group())


def is_main() -> bool:
    """Rank 0 -- also before init and after destroy, when only the launcher's RANK says which rank this is."""
    return (dist.get_rank() if dist.is_initialized() else _env_rank_world()[0]) == 0
