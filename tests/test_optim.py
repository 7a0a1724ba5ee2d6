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
