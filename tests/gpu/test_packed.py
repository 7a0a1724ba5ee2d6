"""Packed documents on a GPU: Transformer Engine's THD attention and its CP chunks, and the CUDA kernels of
megarope's attention split at document bounds.

The CPU tests (tests/test_packing.py, test_attention.py, test_train.py) check the layouts, megarope's attention
at CP 1, 2 and 4 and TP 1 and 2, and training at CP 2 against each document alone. What only a GPU shows:
  - our THD partition is the one Transformer Engine computes (tex.thd_get_partitioned_indices), which its CP
    attention assumes of every rank's tokens;
  - per token, documents packed as THD through TE's attention (and TE's fused THD RoPE, and log-scaled queries
    at each token's own position) give the losses of each document alone (gpu_validation.packed_against_alone,
    which the validation's "packed" check reports);
  - megarope's CP core with documents through the CUDA kernels (each sub-part through attention.kernel_args);
  - TE's THD path under CP = 2 (its DualChunkSwap per document, each document padded to a multiple of 4): two
    ranks on the one GPU, each taken by NCCL for a host of its own (benchmarks/multi_rank.py's environment);
  - a te training run on packed documents: finite, and it records its longest document.
"""

import os
import sys

import pytest
import torch

from distributed import run_distributed
from gpu_setup import BACKEND, CUDA, needs_te, train_config
from megarope import attention as A
from megarope import checkpoint, packing, parallel, train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import gpu_validation  # noqa: E402 - the comparison the validation reports, asserted here
import multi_rank  # noqa: E402 - what two ranks on one GPU need of NCCL

DEVICE = "cuda" if CUDA else "cpu"


@needs_te
@pytest.mark.parametrize("cp", [2, 4])
def test_our_thd_partition_is_transformer_engines(cp):
    import transformer_engine_torch as tex

    lengths = [4 * cp, 12 * cp, 2 * cp, 30 * cp]
    cu_seqlens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    for rank in range(cp):
        te = tex.thd_get_partitioned_indices(cu_seqlens.cuda(), int(cu_seqlens[-1]), cp, rank)
        assert te.cpu().tolist() == packing.thd_partition(cu_seqlens, cp, rank).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if CUDA else [torch.float32])
def test_packed_documents_give_each_token_its_loss_alone(dtype, record_property):
    parallel.init()
    row = gpu_validation.packed_against_alone(BACKEND, dtype, [300, 123, 601] if CUDA else [50, 37, 41])
    for key in ("max_abs_diff", "crossing_max_abs_diff"):
        record_property(key, row[key])
    tolerance = gpu_validation.PACKED_TOLERANCE[row["dtype"]]
    assert row["max_abs_diff"] <= tolerance < row["crossing_max_abs_diff"] / 2, row


CP_LENGTHS = [301, 122, 601]  # none a multiple of 2*CP: TE's chunks need each padded


def _thd_at_cp_2(directory: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One of two ranks on the one GPU: the documents as THD at CP=2 through Transformer Engine, with the weights
    saved in ``directory``. This rank's token losses, which rows of the packed sequence they are, its bounds."""
    import torch.distributed as dist

    from megarope.config import launch_environment

    os.environ.update({**multi_rank.rank_environment(int(os.environ["RANK"])), **launch_environment(1, 2)})
    parallel.init(cp=2)
    model = gpu_validation.packed_model("te", torch.bfloat16, sum(CP_LENGTHS))
    checkpoint.load_model(model, directory)
    rank = dist.get_rank(parallel.cp_group())
    packer = packing.Packing(True, True, 256, "te", 2, rank, 4)
    local, documents = packer.pack(gpu_validation.packed_documents(CP_LENGTHS))
    device = parallel.device()
    losses = gpu_validation.model_losses(model, local["tokens"], local["labels"], packed_seq_params=documents.to(device),
                                         position_ids=local["position_ids"].to(device))
    return losses.cpu(), packing.thd_partition(documents.cu_seqlens_q, 2, rank), documents.cu_seqlens_q.tolist()


@needs_te
def test_thd_under_cp_2_gives_each_token_its_loss_alone(tmp_path, record_property):
    """TE's THD + CP path (p2p): each rank keeps chunks r and 3-r of every padded document; put back in place,
    the real tokens' losses are each document's alone (bf16: TE's CP attention has no fp32 kernels)."""
    parallel.init()
    model = gpu_validation.packed_model("te", torch.bfloat16, sum(CP_LENGTHS))
    checkpoint.save_model(model, str(tmp_path / "model"))
    alone = gpu_validation.documents_alone(model, gpu_validation.packed_documents(CP_LENGTHS), CP_LENGTHS)[0].cpu()
    parallel.destroy()
    starts = [0] + list(torch.tensor(CP_LENGTHS).cumsum(0).tolist())
    worst = 0.0
    for losses, rows, cu_seqlens in run_distributed(_thd_at_cp_2, 2, str(tmp_path / "model")):
        assert all((end - start) % 4 == 0 for start, end in zip(cu_seqlens, cu_seqlens[1:]))
        for loss, row in zip(losses[0].tolist(), rows.tolist()):
            doc = max(i for i, start in enumerate(cu_seqlens[:-1]) if start <= row)
            position = row - cu_seqlens[doc]
            if position < CP_LENGTHS[doc]:  # not padding
                worst = max(worst, abs(loss - float(alone[starts[doc] + position])))
    record_property("max_abs_diff", worst)
    assert worst <= gpu_validation.PACKED_TOLERANCE["bfloat16"], worst


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_cp_core_with_documents_through_the_cuda_kernels(kv_heads, record_property):
    """A CP group of one runs every kind of part; with documents (a micro batch of 2, other bounds in each row)
    each is split into sub-parts, every one a kernel call through kernel_args: fp32 against float64 per document."""
    parallel.init()
    s, heads, d = 200, 8, 64
    bounds = ((0, 37, 150, 200), (0, 99, 100, 200))
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(s, 2, heads, d, device=DEVICE, generator=g)
    k, v = (torch.randn(s, 2, kv_heads, d, device=DEVICE, generator=g) for _ in range(2))
    grad = torch.randn(s, 2, heads, d, device=DEVICE, generator=g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = A.context_parallel_attention(*leaves, parallel.cp_group(), d ** -0.5, bounds=bounds)
    out.backward(grad)
    exact = [t.double().clone().requires_grad_() for t in (q, k, v)]
    expected = A.document_attention(*exact, bounds, d ** -0.5)
    expected.backward(grad.double())
    errors = [float((a.double() - b).abs().max()) for a, b in
              zip((out, *(t.grad for t in leaves)), (expected, *(t.grad for t in exact)))]
    record_property("max_abs_errors_out_dq_dk_dv", errors)
    assert max(errors) < 1e-4, errors


@needs_te
def test_te_trains_on_packed_documents_and_records_the_longest(tmp_path, toy_data_dir, record_property):
    cfg = train_config(str(tmp_path / "run"), toy_data_dir, steps=2)
    cfg["data"].update(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    done = train.run(cfg)
    parallel.destroy()
    record_property("loss", done["loss"])
    assert done["step"] == 2 and done["loss"] is not None
    meta = checkpoint.read_meta(done["checkpoint"])
    longest = meta["trained"]["longest_document"]
    record_property("longest_document", longest)
    assert 0 < longest <= cfg["train"]["seq_len"] and meta["lineage"]["tune_len"] == longest
