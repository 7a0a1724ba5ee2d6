"""Packed documents: where they start, the te backend's THD layout (cumulative lengths, TE's per-document CP
chunks and their padding, read back by megatron's own THD RoPE), the local layout, the longest document."""

import pytest
import test_rope  # its FakeGroup: a CP group's size and rank
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd, _apply_rotary_pos_emb_thd

from megarope import packing
from megarope.rope import RopeConfig, RotaryEmbedding

EOD = 256


def _micro_batch(rows: list[list[int]], length: int) -> dict:
    """Rows of documents of these lengths (each ending in EOD; the last one cut off by the window when longer)."""
    tokens = torch.zeros(len(rows), length, dtype=torch.long)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    for i, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            end = min(start + n, length)
            tokens[i, start:end] = torch.randint(0, EOD, (end - start,), generator=g)
            if start + n <= length:
                tokens[i, start + n - 1] = EOD
            positions[i, start:end] = torch.arange(end - start)
            start = end
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(len(rows), length),
            "position_ids": positions}


def test_documents_start_after_each_eod_as_in_megatron():
    tokens = torch.tensor([5, 6, EOD, 7, EOD, 8, 9, 9])
    assert packing.document_bounds(tokens, EOD) == [0, 3, 5, 8]
    tokens[-1] = EOD  # an EOD at the end ends the last document; nothing starts after it
    assert packing.document_bounds(tokens, EOD) == [0, 3, 5, 8]
    assert packing.document_bounds(torch.tensor([1, 2, 3]), EOD) == [0, 3]


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_thd_layout_pads_each_document_and_keeps_te_s_chunks_on_each_rank(cp):
    rows = [[13, 30, 21], [7, 57]]  # 64 tokens a row: 5 documents
    batch = _micro_batch(rows, 64)
    multiple = packing.thd_multiple(cp, 2, True, False)
    kept, layouts = [], []
    for rank in range(cp):
        packer = packing.Packing(True, True, EOD, "te", cp, rank, multiple)
        local, documents = packer.pack(batch)
        layouts.append((local, documents))
        assert packer.longest == 57
    cu = layouts[0][1].cu_seqlens_q
    lengths = (cu[1:] - cu[:-1]).tolist()
    unit = 2 * cp if cp > 1 else 1
    real = [13, 30, 21, 7, 57]
    assert all(n % unit == 0 and 0 <= n - r < unit for n, r in zip(lengths[:-1], real[:-1]))
    assert int(cu[-1]) % multiple == 0 and lengths[-1] >= real[-1]
    for local, documents in layouts:
        # one tensor for the four, also on the device: TE sees no padding between documents (it sits where
        # causality hides it)
        moved = documents.to("meta")
        for fields in (documents, moved):
            cu_seqlens = fields.cu_seqlens_q
            assert fields.cu_seqlens_kv is cu_seqlens and fields.cu_seqlens_q_padded is cu_seqlens
            assert fields.cu_seqlens_kv_padded is cu_seqlens
        assert moved.cu_seqlens_q.device.type == "meta" and moved.positions.device.type == "meta"
        assert documents.qkv_format == "thd" and documents.cu_seqlens_q.dtype == torch.int32
        assert documents.max_seqlen_q == max(lengths) and all(v.shape == (1, int(cu[-1]) // cp) for v in local.values())
    for rank, (local, _) in enumerate(layouts):
        if cp == 1:  # no CP: the documents one after another, each as long as it is
            kept.append(torch.arange(int(cu[-1])))
            continue
        rows_kept = packing.thd_partition(cu, cp, rank)
        chunks = [(start + c * (n // (2 * cp)), n // (2 * cp)) for start, n in zip(cu.tolist(), lengths)
                  for c in (rank, 2 * cp - 1 - rank)]
        assert rows_kept.tolist() == [s + i for s, n in chunks for i in range(n)]
        kept.append(rows_kept)
    assert sorted(torch.cat(kept).tolist()) == list(range(int(cu[-1])))
    # reassembled in sequence order: the documents' tokens, then padding with no loss
    order = torch.cat(kept).argsort()
    whole = {key: torch.cat([local[key][0] for local, _ in layouts])[order] for key in ("tokens", "loss_mask")}
    positions = torch.cat([local["position_ids"][0] for local, _ in layouts])[order]
    documents = [batch["tokens"][0, :13], batch["tokens"][0, 13:43], batch["tokens"][0, 43:], batch["tokens"][1, :7],
                 batch["tokens"][1, 7:]]
    for start, n, doc in zip(cu.tolist(), lengths, documents):
        assert torch.equal(whole["tokens"][start:start + len(doc)], doc)
        end = start + len(doc)
        assert whole["loss_mask"][start:end].all() and not whole["loss_mask"][end:start + n].any()
        assert positions[start:start + n].tolist() == list(range(n))
    assert torch.equal(layouts[0][1].positions, layouts[0][0]["position_ids"][0])


@pytest.mark.parametrize("cp", [1, 2])
def test_megatrons_thd_rope_reads_our_layout_as_each_tokens_own_position(cp):
    """megatron's THD RoPE (rope_utils, the unfused form of TE's fused kernel) rotates each CP rank's tokens by
    positions it derives from cu_seqlens and TE's chunking alone: they must be the ones the layout says."""
    batch = _micro_batch([[13, 30, 21], [7, 57]], 64)
    table = RotaryEmbedding(RopeConfig(base=100.0), kv_channels=16)(64)
    for rank in range(cp):
        local, documents = packing.Packing(True, True, EOD, "te", cp, rank, 2 * cp).pack(batch)
        t = torch.randn(local["tokens"].shape[1], 2, 16, generator=torch.Generator().manual_seed(rank))
        group = test_rope.FakeGroup(cp, rank)
        rotated = _apply_rotary_pos_emb_thd(t, documents.cu_seqlens_q_padded, table, cp_group=group)
        expected = _apply_rotary_pos_emb_bshd(t[:, None], table[documents.positions])[:, 0]
        torch.testing.assert_close(rotated, expected)


def test_local_layout_keeps_rows_and_reads_the_spans_of_attention():
    batch = _micro_batch([[13, 30, 21], [7, 57]], 64)
    local, documents = packing.Packing(True, True, EOD, "local").pack(batch)
    assert all(torch.equal(local[key], batch[key]) for key in batch)
    assert documents.qkv_format == "sbhd" and documents.separate and documents.bounds == ((0, 13, 43, 64), (0, 7, 64))
    assert documents.lengths[0].tolist() == [13] * 13 + [30] * 30 + [21] * 21
    assert documents.table_lengths == (7, 13, 21, 30, 57)
    # positions restart, attention does not: one span a row, as long as its longest document
    _, crossing = packing.Packing(True, False, EOD, "local").pack(batch)
    assert not crossing.separate and crossing.bounds == ((0, 64), (0, 64))
    assert crossing.lengths[0].unique().tolist() == [30] and crossing.lengths[1].unique().tolist() == [57]
    # neither option: nothing is packed, and the trained length stays the sequence's
    packer = packing.Packing(False, False, EOD, "local")
    assert packer.pack(batch) == (batch, None) and packer.longest == 0 and not packer.active
