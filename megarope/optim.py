"""The optimizer and learning-rate schedule of `megarope train`.

megatron's distributed optimizer on GPUs. On a CPU, where megatron's optimizers assert CUDA tensors
(fp32, bf16 and distributed alike), torch.optim.AdamW behind a small adapter (TorchAdamW) with the
part of megatron's optimizer interface that training and checkpointing use. make_optimizer is the
one place that chooses. The schedule is megatron's OptimizerParamScheduler for both.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megarope import config as configuration

class TorchAdamW:
    """torch.optim.AdamW over fp32 master weights, with the part of megatron's optimizer interface
    that training and checkpointing use: step() -> (updated, grad_norm, None), zero_grad(),
    param_groups, state_dict()/load_state_dict(), sharded_state_dict(model_sharded_state_dict).

    Gradients come from DDP's fp32 main_grad buffers. The gradient norm is that of the whole model:
    each tensor-parallel shard counted once, replicated parameters once (megatron's rule), summed
    over the model-parallel group. The step is skipped (nothing changes) when the norm is not finite.
    """

    def __init__(self, model_chunks, train_cfg):
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.transformer.module import param_is_not_shared

        self.model_params = [p for chunk in model_chunks for p in chunk.parameters() if p.requires_grad]
        self.main_params = [p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float())
                            for p in self.model_params]
        names = {id(p): n for chunk in model_chunks for n, p in chunk.named_parameters()}
        groups = {1.0: [], 0.0: []}  # megatron's default: no weight decay for biases and 1-D (norm) weights
        for p, main in zip(self.model_params, self.main_params):
            no_wd = p.dim() == 1 or names.get(id(p), "").endswith(".bias")
            groups[0.0 if no_wd else 1.0].append(main)
        self._order = [main for mult in (1.0, 0.0) for main in groups[mult]]  # the optimizer's param order
        by_main = {id(m): p for p, m in zip(self.model_params, self.main_params)}
        self._model_in_order = [by_main[id(m)] for m in self._order]
        self.optimizer = torch.optim.AdamW(
            [{"params": groups[mult], "wd_mult": mult, "default_config": True} for mult in (1.0, 0.0) if groups[mult]],
            lr=train_cfg.lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2), eps=train_cfg.adam_eps,
            weight_decay=train_cfg.weight_decay, foreach=False)
        self.clip_grad = train_cfg.clip_grad
        self._for_norm = [param_is_not_shared(p) and tensor_parallel.param_is_not_tensor_parallel_duplicate(p)
                          for p in self._model_in_order]
        self._mp_group = parallel_state.get_model_parallel_group()
        self._init_state()  # zero moments at step 0 act as a fresh AdamW; a checkpoint always has them

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True):
        for main in self._order:
            main.grad = None

    def grad_norm(self) -> float:
        total = torch.zeros((), dtype=torch.float64)
        for p, main, counted in zip(self._model_in_order, self._order, self._for_norm):
            if counted and main.grad is not None:
                total += main.grad.double().pow(2).sum()
        if dist.is_initialized() and dist.get_world_size(self._mp_group) > 1:
            dist.all_reduce(total, group=self._mp_group)
        return math.sqrt(total.item()) if math.isfinite(total.item()) else float("nan")

    @torch.no_grad()
    def step(self):
        for p, main in zip(self._model_in_order, self._order):
            grad = getattr(p, "main_grad", None)
            grad = p.grad if grad is None else grad
            main.grad = None if grad is None else grad.float()
        norm = self.grad_norm()
        if not math.isfinite(norm):
            return False, norm, None
        if self.clip_grad > 0 and norm > self.clip_grad:
            scale = self.clip_grad / (norm + 1e-6)
            for main in self._order:
                if main.grad is not None:
                    main.grad.mul_(scale)
        self.optimizer.step()
        for p, main in zip(self._model_in_order, self._order):
            if p is not main:
                p.copy_(main)
        return True, norm, None

    @torch.no_grad()
    def reload_model_params(self, state_dict=None):
        """Copy the model's weights into the fp32 masters (after loading weights into the model)."""
        for p, main in zip(self._model_in_order, self._order):
            if p is not main:
                main.copy_(p)

    # -- state: the Adam moments (and fp32 masters of bf16 weights) as sharded tensors of the model's keys
    def state_dict(self) -> dict:
        state = self.optimizer.state_dict()
        for i, (p, main) in enumerate(zip(self._model_in_order, self._order)):
            if p is not main and i in state["state"]:
                state["state"][i]["fp32_param"] = main.detach()
        return state

    def load_state_dict(self, state: dict) -> None:
        state = {"state": dict(state["state"]), "param_groups": state["param_groups"]}
        if "common_step" in state["state"]:
            step = state["state"].pop("common_step")
            for entry in state["state"].values():
                entry["step"] = step.clone() if isinstance(step, torch.Tensor) else torch.tensor(float(step))
        masters = {i: entry.pop("fp32_param") for i, entry in state["state"].items() if "fp32_param" in entry}
        self.optimizer.load_state_dict(state)
        with torch.no_grad():
            for i, value in masters.items():
                self._order[i].copy_(value)

    def _init_state(self) -> None:
        for main in self._order:
            if not self.optimizer.state[main]:
                self.optimizer.state[main] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(main),
                                              "exp_avg_sq": torch.zeros_like(main)}

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
        """The state as sharded tensors named by the model's keys, so it loads at any TP/CP/PP/DP layout.

        ``metadata`` is megatron's optimizer-checkpoint metadata (CHECKPOINT_METADATA), taken for the
        same call signature: this format is always the model-space one, whatever it names.
        """
        from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                                optim_state_to_sharding_state)

        if is_loading:
            self._init_state()
        state = self.state_dict()
        steps = {float(entry["step"]) for entry in state["state"].values() if "step" in entry}
        if len(steps) > 1:
            raise RuntimeError(f"parameters were stepped unequally: {sorted(steps)}")
        step = next(iter(state["state"].values()))["step"] if steps else None
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self._model_in_order)
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        if step is not None:
            state["state"]["common_step"] = step
        return state


# What megatron's distributed optimizer is asked to save and load: the format megatron's own
# training checkpoints use in 0.19.2 (megatron.training.checkpointing's sharded-state metadata).
# "dp_reshardable" writes each rank's buffers as they are, with no gather, in parallel; it reshards over
# data parallelism only (DP x CP for this optimizer, which shards over both), so a resume may change
# DP and CP but not TP, PP or virtual stages (train refuses that in one line). Without this metadata
# 0.19.2 picks "fully_sharded_model_space", whose flattened tensors its own checkpointing refuses.
# The fully reshardable format would gather every bucket on all DP ranks at each save (tens of GB of
# host memory per rank for a 70B model), for a layout change that a run seldom needs.
CHECKPOINT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
                       "chained_optim_avoid_prefix": True}


# Parameters per gradient bucket of DDP on GPUs, where gradient reduction overlaps the backward pass.
# Left unset, megatron-core 0.19.2 makes it max(40M, 1M x DP) (DistributedDataParallel.__init__), and a
# dp_reshardable checkpoint loads only into the bucket sizes it was saved from (the distributed optimizer's
# load_parameter_state_from_dp_reshardable asserts them): a checkpoint saved at DP <= 40 would not resume at
# DP > 40, nor one from DP 64 at DP 80. Pinned to that default for DP <= 40, so a resume may change DP freely.
# The trade-off: above DP 40 each rank's part of a bucket's reduce-scatter shrinks below the 1M elements megatron
# keeps there for NCCL's bandwidth (40M / DP; 0.5M at DP 80).
DDP_BUCKET_SIZE = 40_000_000


def ddp_bucket_size(resumed: dict | None) -> int:
    """The bucket size of a run: that of the checkpoint it resumes (``resumed``: its train_state), else
    DDP_BUCKET_SIZE. A checkpoint saved before the size was recorded had megatron's default at its DP."""
    if resumed is None or resumed.get("optimizer") != "megatron-distributed":
        return DDP_BUCKET_SIZE
    if resumed.get("ddp_bucket_size"):
        return int(resumed["ddp_bucket_size"])
    return max(DDP_BUCKET_SIZE, 1_000_000 * int(resumed.get("layout", {}).get("dp", 1)))


def make_ddp_config(gpu: bool, resumed: dict | None = None):
    """megatron DDP's config for a run: gradients reduced in fp32; on GPUs overlapped with the backward pass,
    in buckets of ddp_bucket_size(resumed) parameters, for the distributed optimizer; on a CPU in one bucket
    after the backward pass (torch AdamW)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=gpu,
                                         use_distributed_optimizer=gpu,
                                         bucket_size=ddp_bucket_size(resumed) if gpu else None)


def optimizer_kind() -> str:
    return "megatron-distributed" if torch.cuda.is_available() else "torch-adamw"


def reshards_across_model_parallel(kind: str) -> bool:
    """Whether a checkpoint of this optimizer kind loads at another TP/PP layout (see CHECKPOINT_METADATA)."""
    return kind == "torch-adamw"


def make_optimizer(model_chunks: list, cfg: configuration.Config, dtype: str):
    """megatron's distributed optimizer on GPUs; torch AdamW (TorchAdamW) on a CPU, where megatron's
    optimizers assert CUDA tensors (fp32, bf16 and distributed alike). ``model_chunks``: the DDP-wrapped
    model chunks of this rank; ``dtype``: the resolved train.dtype. Returns (optimizer, kind)."""
    t = cfg.train
    if optimizer_kind() == "torch-adamw":
        return TorchAdamW(model_chunks, t), "torch-adamw"
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    bf16 = dtype == "bf16"
    optimizer_config = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, use_distributed_optimizer=True)
    return get_megatron_optimizer(optimizer_config, list(model_chunks)), "megatron-distributed"


def make_scheduler(optimizer, cfg: configuration.Config):
    """megatron's OptimizerParamScheduler (plain Python over param_groups, so it drives torch AdamW
    too): linear warmup from 0 to train.lr, then train.lr_decay_style down to train.min_lr at the
    last step. It is advanced before each update, so update k uses the rate of step k."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.train
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=t.steps, lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay,
        end_wd=t.weight_decay, wd_incr_steps=t.steps, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
