import pytest
import torch

from megarope import parallel
from megarope.errors import UsageError


def test_world_must_divide_by_model_parallel_sizes():
    parallel.check_sizes(8, 2, 2, 2)
    with pytest.raises(UsageError, match="not divisible"):
        parallel.check_sizes(6, 4, 1)
    with pytest.raises(UsageError, match="parallel.cp"):
        parallel.check_sizes(2, 1, 0)


def test_rank_from_torchrun_then_slurm(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    assert parallel._env_rank_world() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    assert parallel._env_rank_world() == (5, 8, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert parallel._env_rank_world() == (3, 4, 3)


def test_single_process_layout_and_cp_slice_is_identity():
    layout = parallel.init()
    assert (layout.tp, layout.cp, layout.dp, layout.world) == (1, 1, 1, 1)
    assert "TP 1 x CP 1" in layout.describe()
    batch = {"tokens": torch.arange(8).view(1, 8)}
    assert torch.equal(parallel.slice_for_cp(batch)["tokens"], batch["tokens"])
    assert parallel.device() == torch.device("cpu")


def test_ensure_sets_up_a_world_of_one_once_and_checks_an_existing_layout():
    assert parallel.ensure() is True  # no parallel state: a world of one, for the caller to destroy
    assert parallel.ensure() is False and parallel.ensure(1, 1) is False
    with pytest.raises(UsageError, match="parallel state is TP 1 x CP 1, asked for TP 2 x CP 1"):
        parallel.ensure(tp=2)


def test_cp_positions_follow_megatrons_load_balanced_order():
    assert parallel.cp_local_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert parallel.cp_local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    together = torch.cat([parallel.cp_local_positions(24, 3, r) for r in range(3)])
    assert sorted(together.tolist()) == list(range(24))
    with pytest.raises(ValueError, match="divisible"):
        parallel.cp_local_positions(10, 2, 0)


def test_layout_describes_pipeline_and_virtual_stages():
    layout = parallel.Layout(tp=2, cp=1, pp=2, dp=2, world=8, rank=0, vpp=3)
    assert layout.describe() == "world 8 = TP 2 x CP 1 x PP 2 (x 3 virtual stages) x DP 2"


def _fail_on_rank_1(kind):
    from megarope import parallel

    parallel.init()
    import torch.distributed as dist

    try:
        with parallel.fail_together():
            if dist.get_rank() == 1:
                raise UsageError("rank 1 saw bad input") if kind == "usage" else KeyError("rank 1 broke")
        return "passed"
    except (UsageError, RuntimeError, KeyError) as e:
        return f"{type(e).__name__}: {e}"


@pytest.mark.slow
def test_every_rank_raises_when_one_fails_inside_fail_together():
    from distributed import run_distributed

    assert run_distributed(_fail_on_rank_1, 2, "usage") == [
        "UsageError: another rank stopped on bad input (see its message)", "UsageError: rank 1 saw bad input"]
    assert run_distributed(_fail_on_rank_1, 2, "other") == [
        "RuntimeError: another rank failed (see its error)", "KeyError: 'rank 1 broke'"]


def test_fail_together_in_one_process_raises_its_own_error_only():
    parallel.init()
    with parallel.fail_together():
        pass
    with pytest.raises(UsageError, match="mine"):
        with parallel.fail_together():
            raise UsageError("mine")
    parallel.wait_for_all()  # a world of one waits for nobody


# ----------------------------------------------------------------------------------------------- GPUs
def test_each_rank_takes_its_own_gpu_or_the_one_it_is_given():
    assert [parallel.cuda_device(r, 8) for r in range(8)] == list(range(8))  # torchrun: every rank sees 8
    assert parallel.cuda_device(5, 1) == 0  # srun --gpus-per-task=1: each task sees its own GPU as device 0
    with pytest.raises(UsageError, match="local rank 4 has no GPU of its own: this process sees 2 GPUs"):
        parallel.cuda_device(4, 2)


def test_srun_with_one_gpu_bound_per_task_starts_nccl_on_device_0(monkeypatch):
    """Plain srun, rank 1 of 2 on its node with one GPU bound to it: set_device(SLURM_LOCALID = 1) was an
    invalid ordinal there; init takes device 0 and starts NCCL with Slurm's rank and world."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in (("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "1"),
                       ("MASTER_ADDR", "node0"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(var, value)
    devices, started = [], []

    class Started(Exception):
        pass

    def init_process_group(backend, **kwargs):
        started.append((backend, kwargs["rank"], kwargs["world_size"], kwargs["init_method"]))
        raise Started  # stop here: there is no rank 0 to meet

    monkeypatch.setattr(parallel.compat, "uses_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(parallel.dist, "init_process_group", init_process_group)
    with pytest.raises(Started):
        parallel.init()
    assert devices == [0] and started == [("nccl", 1, 2, None)]

    monkeypatch.delenv("MASTER_PORT")  # env:// needs it: one line instead of torch's
    with pytest.raises(UsageError, match="MASTER_ADDR is set but MASTER_PORT is not"):
        parallel.init()


def test_on_gpus_each_pipeline_stage_seeds_as_megatrons_training_does(monkeypatch):
    """megatron/training/initialize.py seeds stage p with seed + 100 p; megarope seeded every stage alike, so on
    GPUs (where each stage draws its own weights on the GPU) later stages repeated the first one's draws. On a
    CPU the seed stays the same on every stage: the weights are drawn whole there (see model.build_model)."""
    parallel.init()
    parallel.seed_everything(1234)
    assert torch.initial_seed() == 1234
    seeds = []
    monkeypatch.setattr(parallel.compat, "uses_cuda", lambda: True)
    monkeypatch.setattr(parallel.tensor_parallel, "model_parallel_cuda_manual_seed", seeds.append)
    for stage in (0, 1, 3):
        monkeypatch.setattr(parallel.parallel_state, "get_pipeline_model_parallel_rank", lambda stage=stage: stage)
        parallel.seed_everything(1234)
        assert torch.initial_seed() == 1234 + 100 * stage
    assert seeds == [1234, 1334, 1534]
