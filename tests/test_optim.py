"""The optimizer's checkpoint format: what megatron's distributed optimizer is asked for, and the CPU one."""

import torch

from megarope import config, optim, parallel
from megarope.model import build_model, get_preset
from megarope.rope import RopeConfig


def test_the_distributed_optimizer_is_asked_for_a_format_0_19_2_saves():
    """Without distrib_optim_sharding_type megatron 0.19.2 picks fully_sharded_model_space, whose flattened
    tensors its own checkpointing refuses; megatron's training passes dp_reshardable."""
    assert optim.CHECKPOINT_METADATA["distrib_optim_sharding_type"] == "dp_reshardable"
    assert optim.reshards_across_model_parallel("torch-adamw")
    assert not optim.reshards_across_model_parallel("megatron-distributed")


def test_the_cpu_optimizer_takes_the_same_metadata_and_keys_its_state_by_the_models_names():
    parallel.init()
    model = build_model(get_preset("toy"), RopeConfig(base=1e4, train_len=64))
    cfg = config.validate({"data": {"path": "p"}, "train": {"steps": 2, "warmup_steps": 0}})
    optimizer = optim.TorchAdamW([model], cfg.train)
    state = optimizer.sharded_state_dict(model.sharded_state_dict(), metadata=dict(optim.CHECKPOINT_METADATA))
    keys = {t.key for entry in state["state"].values() if isinstance(entry, dict) for t in entry.values()}
    assert "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc2.weight" in keys
    assert torch.is_tensor(state["state"]["common_step"])


def _llama2_7b_parameters() -> list:
    """llama2-7b's parameters in megatron's order, as shapes only (the meta device holds no memory)."""
    p = get_preset("llama2-7b")
    h, f, vocab = p.hidden_size, p.ffn_hidden_size, p.padded_vocab_size
    layer = [(h,), (3 * h, h), (h, h), (h,), (2 * f, h), (h, f)]
    shapes = [(vocab, h)] + layer * p.num_layers + [(h,), (vocab, h)]
    return [torch.nn.Parameter(torch.empty(s, device="meta", dtype=torch.bfloat16)) for s in shapes]


def test_a_distributed_optimizer_checkpoint_resumes_across_dp_40():
    """The distributed optimizer's dp_reshardable state holds every bucket's size, and a load asserts that
    they match. megatron sizes the buckets max(40M, 1M x DP) when DDP's bucket_size is unset, so the
    buckets of DP 40 and DP 64 differ (the reading was right); megarope pins the size, and they do not."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    params, ddp = _llama2_7b_parameters(), optim.make_ddp_config(gpu=True)

    def buckets(bucket_size, dp):
        layout = DistributedOptimizer.compute_full_param_layout(params, bucket_size, dp, ddp)
        return [buffer.per_bucket_numel_unpadded for buffer in layout.layouts.values()]

    pinned = buckets(ddp.bucket_size, 8)
    assert len(pinned[0]) > 1 and all(buckets(ddp.bucket_size, dp) == pinned for dp in (40, 41, 64, 128))
    def megatrons_default(dp):  # DistributedDataParallel.__init__'s rule when bucket_size is None
        return max(40_000_000, 1_000_000 * dp)

    assert buckets(megatrons_default(40), 40) == pinned != buckets(megatrons_default(64), 64)
    assert optim.make_ddp_config(gpu=False).bucket_size is None  # a CPU reduces in one bucket, no overlap


def test_a_resume_keeps_the_bucket_size_its_checkpoint_was_saved_with():
    kind = "megatron-distributed"
    assert optim.ddp_bucket_size(None) == optim.DDP_BUCKET_SIZE == 40_000_000
    assert optim.ddp_bucket_size({"optimizer": kind, "ddp_bucket_size": 40_000_000, "layout": {"dp": 64}}) == 40_000_000
    # saved before the size was recorded: megatron's default at the saved DP
    assert optim.ddp_bucket_size({"optimizer": kind, "layout": {"dp": 64}}) == 64_000_000
    assert optim.ddp_bucket_size({"optimizer": kind, "layout": {"dp": 8}}) == 40_000_000
    assert optim.ddp_bucket_size({"optimizer": "torch-adamw", "layout": {"dp": 64}}) == 40_000_000
    assert optim.make_ddp_config(gpu=True, resumed={"optimizer": kind, "layout": {"dp": 64}}).bucket_size == 64_000_000
