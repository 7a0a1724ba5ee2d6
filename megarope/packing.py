"""Packed sequences: documents that share a training sequence but not their attention or positions.

megatron's GPTDataset cuts the token stream into train.seq_len windows across document boundaries.
Three of its options (GPTDatasetConfig; megatron's defaults, and megarope's, are all off) say what a
boundary means:

    reset_position_ids    positions restart after each EOD token (the dataset's position_ids)
    reset_attention_mask  a token attends only to the tokens of its own document
    eod_mask_loss         no loss where the input token is EOD (the prediction across a boundary)

A document ends with its EOD token, as in megatron's _get_ltor_masks_and_position_ids: the next one
starts after it. A window's first document may be the tail of a longer one and its last the head of
the next; each is a document of the window.

The dataset gives the positions and the loss mask; this module gives attention its documents, laid
out for the backend (:meth:`Packing.pack`):

local  megatron's [s, b] layout stays. Each row's document bounds travel with the micro batch in a
       :class:`Documents`: megatron's PackedSeqParams with qkv_format "sbhd", which megatron's layers
       pass through to the core attention untouched (they act only on "thd"). CP keeps megatron's
       load-balanced chunks of the whole sequence (every shape stays fixed, so pipelines work): a
       document may straddle chunks, and megarope's attention splits its parts at the bounds.
te     THD, as Transformer Engine takes packed sequences: the rows of the micro batch become one row of
       documents with cumulative lengths (cu_seqlens). Under CP, TE's DualChunkSwap splits every
       document into 2*CP chunks and needs each length a multiple of 2*CP (TE 2.19's
       attn_forward_func_with_cp), so each document is padded to one; rank r keeps chunks r and
       2*CP-1-r of every document (what tex.thd_get_partitioned_indices gives megatron's
       get_batch_on_this_cp_rank). The padding sits at the end of its document, so causal attention
       keeps every real token from it, and its loss is masked: the cumulative lengths may count it
       (megatron's pretrain_gpt.py passes the padded ones as cu_seqlens too), and TE then sees no
       padding between sequences (pad_between_seqs False: its flash kernels stay eligible).

The scaling law's T_tune: where positions or attention restart at each document, no token sees a
relative distance as long as its window; the run has trained at the length of its longest document.
:attr:`Packing.longest` keeps it for the micro batches this process built (train.py records the
maximum over all ranks in each checkpoint and its lineage).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megarope import parallel

def document_bounds(tokens: torch.Tensor, eod: int) -> list[int]:
    """Where each document of a row of ``tokens`` starts, and its length: [0, ..., len(tokens)].
    A document ends with its EOD token (megatron's rule); an EOD at the end ends the last one."""
    length = tokens.shape[-1]
    after_eod = (torch.nonzero(tokens == eod).flatten() + 1).tolist()
    return [0] + [i for i in after_eod if i < length] + [length]


def thd_partition(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """The THD rows CP rank ``cp_rank`` keeps: chunks r and 2*CP-1-r of each document (its length a
    multiple of 2*CP), in document order -- tex.thd_get_partitioned_indices, on any device."""
    bounds = cu_seqlens.tolist()
    rows = []
    for start, end in zip(bounds, bounds[1:]):
        chunk = (end - start) // (2 * cp_size)
        for c in parallel.cp_chunk_ids(cp_size, cp_rank):
            rows.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(rows)


@dataclass
class Documents(PackedSeqParams):
    """The documents of a micro batch, as megarope's layers read them (megatron's layers, and TE, see only
    PackedSeqParams' own fields).

    qkv_format "sbhd" (local backend): ``bounds`` holds each row's document starts and its length, in
    global positions of the whole sequence (before CP); ``separate``: attention stays inside each
    document (reset_attention_mask; without it the bounds are the whole row). qkv_format "thd" (te
    backend): megatron's cu_seqlens fields describe the documents.
    ``positions``: this rank's tokens' positions, [b, s] or [t] (the dataset's position_ids: they
    restart at each document with reset_position_ids); RoPE and log-scaled attention read them.
    ``lengths``: for dynamic NTK, the length of each token's attention span: one past the largest
    position in its document (in its row without ``separate``); ``table_lengths`` its distinct values.
    """

    bounds: tuple = ()
    separate: bool = False
    positions: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    table_lengths: tuple = ()

    def to(self, device) -> "Documents":
        """On ``device``; a tensor that several fields share stays shared (TE reads the THD cumulative lengths
        being one tensor as: no padding between documents)."""
        moved = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                moved.setdefault(id(value), value.to(device, non_blocking=True))
        return dataclasses.replace(self, **{f.name: moved[id(getattr(self, f.name))] for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


class Packing:
    """How micro batches of a run are packed: the data options, the backend's layout, the CP rank.

    ``multiple`` (te): the packed row's length is made a multiple of it (padding the last document), for
    what the layers need of the tokens of a rank (sequence parallelism, FP8 GEMMs); see
    :func:`thd_multiple`.
    """

    def __init__(self, reset_position_ids: bool, reset_attention_mask: bool, eod: int, backend: str,
                 cp_size: int = 1, cp_rank: int = 0, multiple: int = 1):
        self.reset_position_ids, self.separate, self.eod = reset_position_ids, reset_attention_mask, eod
        self.backend, self.cp_size, self.cp_rank, self.multiple = backend, cp_size, cp_rank, multiple
        self.longest = 0  # the longest document of the micro batches packed so far (see the module docstring)

    @property
    def active(self) -> bool:
        return self.reset_position_ids or self.separate

    def pack(self, batch: dict) -> tuple[dict, Documents | None]:
        """This rank's share of a micro batch of [b, S] tensors (tokens, labels, loss_mask, position_ids,
        on the host) and its Documents (None without packing): CP-sliced, and for te in THD."""
        if not self.active:
            return (parallel.slice_for_cp(batch) if self.cp_size > 1 else batch), None
        bounds = [document_bounds(row, self.eod) for row in batch["tokens"]]
        self.longest = max(self.longest, *(max(b - a for a, b in zip(row, row[1:])) for row in bounds))
        if self.backend == "te":
            return self._thd(batch, bounds)
        return self._local(batch, bounds)

    def _local(self, batch: dict, bounds: list[list[int]]) -> tuple[dict, Documents]:
        rows, length = batch["tokens"].shape
        spans = bounds if self.separate else [[0, length]] * rows
        lengths = torch.empty_like(batch["position_ids"])
        for i, row in enumerate(spans):
            for start, end in zip(row, row[1:]):
                lengths[i, start:end] = batch["position_ids"][i, start:end].max() + 1
        batch = {**batch, "ntk_lengths": lengths}
        if self.cp_size > 1:
            batch = parallel.slice_for_cp(batch)
        lengths = batch.pop("ntk_lengths")
        return batch, Documents(qkv_format="sbhd", max_seqlen_q=length, max_seqlen_kv=length,
                                bounds=tuple(tuple(row) for row in spans), separate=self.separate,
                                positions=batch["position_ids"], lengths=lengths,
                                table_lengths=tuple(sorted(set(lengths.flatten().tolist()))))

    def _thd(self, batch: dict, bounds: list[list[int]]) -> tuple[dict, Documents]:
        unit = 2 * self.cp_size if self.cp_size > 1 else 1
        pieces = [(i, start, end) for i, row in enumerate(bounds) for start, end in zip(row, row[1:])]
        padded = [math.ceil((end - start) / unit) * unit for _, start, end in pieces]
        padded[-1] += -sum(padded) % self.multiple  # a multiple of unit too: the caller's multiple is one
        total = sum(padded)
        packed = {key: torch.zeros(total, dtype=batch[key].dtype) for key in ("tokens", "labels", "loss_mask")}
        positions = torch.cat([torch.arange(n) for n in padded])
        offset = 0
        for (i, start, end), n in zip(pieces, padded):
            for key in packed:
                packed[key][offset:offset + end - start] = batch[key][i, start:end]
            offset += n
        cu_seqlens = torch.tensor([0] + padded, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        if self.cp_size > 1:
            keep = thd_partition(cu_seqlens, self.cp_size, self.cp_rank)
            packed = {key: value[keep] for key, value in packed.items()}
            positions = positions[keep]
        packed = {key: value[None] for key, value in packed.items()}
        packed["position_ids"] = positions[None]
        # One tensor for all four: TE then knows that no padding lies between documents (see the docstring)
        return packed, Documents(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                 cu_seqlens_q_padded=cu_seqlens, cu_seqlens_kv_padded=cu_seqlens,
                                 max_seqlen_q=max(padded), max_seqlen_kv=max(padded), separate=True,
                                 positions=positions)


def thd_multiple(cp_size: int, tp_size: int, sequence_parallel: bool, fp8: bool) -> int:
    """What the te backend's packed row must be a multiple of: 2*CP (every document is, under CP), times TP
    with sequence parallelism (each TP rank takes a slice of a CP rank's tokens), times 16 with FP8 (TE's FP8
    GEMMs take a multiple of 8 tokens; preflight.check_fp8_shapes)."""
    return (2 * cp_size if cp_size > 1 else 1) * (tp_size if sequence_parallel else 1) * (16 if fp8 else 1)
