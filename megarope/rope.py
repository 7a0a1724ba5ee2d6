"""RoPE configuration and the paper's evaluation-time variants, with global positions under CP.

Under context parallelism megatron splits each sequence into 2*CP chunks and gives rank r the
chunks r and 2*CP-1-r (load balancing for causal attention). Everything position-dependent here
(the rotary table, dynamic NTK's length, log-scaled queries) is computed from *global* positions,
so a CP=N run sees exactly what a CP=1 run sees.

Packed documents (packing.Documents, local backend): each token takes the rotary angle of its own
position (the dataset's position_ids: with reset_position_ids they restart at each document), and
dynamic NTK the base of its own document's length, so a document packed with others is encoded as
it would be alone (RotaryEmbedding.document_table). The te backend's THD layout restarts positions
at each document inside megatron's and TE's RoPE (one table for the micro batch).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding as _McoreRotary
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding as _McoreYarn

from megarope.packing import Documents
from megarope.parallel import cp_local_positions


@dataclass(frozen=True)
class Yarn:
    """YaRN (Peng et al., 2023) with megatron-core's YarnRotaryEmbedding parameters, one for one.

    factor: the scale s; frequencies whose period exceeds original_len/beta_slow turns are divided by
        s, those under original_len/beta_fast turns are kept, a linear ramp joins them.
    original_len: the context the model was pretrained at (HF's original_max_position_embeddings).
    mscale, mscale_all_dim: the attention temperature: cos and sin are multiplied by
        (0.1*mscale*ln s + 1) / (0.1*mscale_all_dim*ln s + 1) (1 for s <= 1), so q.k by its square.
    truncate: round the ramp's ends to whole dimensions (megatron's correction_range_round_to_int).
    """

    factor: float
    original_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True

    def __post_init__(self):
        if not self.factor > 0 or self.original_len < 1:
            raise ValueError(f"yarn needs factor > 0 and original_len >= 1, got {self.factor}, {self.original_len}")

    @property
    def attention_factor(self) -> float:
        """What cos and sin are multiplied by (megatron's concentration factor, HF's attention_factor)."""
        def m(scale):
            return 1.0 if self.factor <= 1 else 0.1 * scale * math.log(self.factor) + 1.0

        return m(self.mscale) / m(self.mscale_all_dim)

    def megatron_config(self) -> dict:
        """The TransformerConfig attributes megatron-core reads YaRN from (MLATransformerConfig declares them;
        GPTModel and the attention's concentration factor read them with getattr)."""
        return {"yarn_rotary_scaling_factor": self.factor, "yarn_original_max_position_embeddings": self.original_len,
                "yarn_beta_fast": self.beta_fast, "yarn_beta_slow": self.beta_slow, "yarn_mscale": self.mscale,
                "yarn_mscale_all_dim": self.mscale_all_dim, "yarn_correction_range_round_to_int": self.truncate}


@dataclass(frozen=True)
class RopeConfig:
    """How positions are encoded.

    base: the RoPE base beta (theta_n = beta^(-2n/d)); any float > 1.
    rotary_percent: fraction of each head's dimensions that rotate.
    train_len: the length the model was (continued-)trained at, T_train or T_tune in the paper;
        the reference length for dynamic NTK and the default T_ref of log-scaled attention.
    dynamic_ntk: recompute the base for the length being evaluated (paper, "Evaluation-time
        variants"): beta' = beta * (alpha*L/T - (alpha-1))^(d/(d-2)) when L > T.
    ntk_alpha: alpha in that formula (1 in the common form).
    log_scale_ref: T_ref for log-scaled attention: queries at 1-based position t are multiplied by
        max(1, ln t / ln T_ref). None turns it off.
    linear_factor, llama3_factor: megatron-core's own position interpolation and Llama-3 scaling,
        passed through to it unchanged; llama3_low_freq_factor, llama3_high_freq_factor and
        llama3_original_len are Llama-3's other three numbers (Meta's 1, 4 and 8192 by default).
    yarn: YaRN through megatron-core's YarnRotaryEmbedding (a :class:`Yarn`, or its fields as a dict).
    At most one of linear_factor, llama3_factor and yarn; dynamic NTK rescales a plain base, so it
    does not combine with llama3 or yarn (they fix their own frequencies).
    """

    base: float = 10000.0
    rotary_percent: float = 1.0
    train_len: int = 4096
    dynamic_ntk: bool = False
    ntk_alpha: float = 1.0
    log_scale_ref: int | None = None
    linear_factor: float | None = None
    llama3_factor: float | None = None
    llama3_low_freq_factor: float = 1.0
    llama3_high_freq_factor: float = 4.0
    llama3_original_len: int = 8192
    yarn: Yarn | None = None

    def __post_init__(self):
        if isinstance(self.yarn, dict):  # as read back from a checkpoint's JSON
            object.__setattr__(self, "yarn", Yarn(**self.yarn))
        if not self.base > 1:
            raise ValueError(f"rope base must be > 1, got {self.base}")
        if not 0 < self.rotary_percent <= 1:
            raise ValueError(f"rotary_percent must be in (0, 1], got {self.rotary_percent}")
        if self.log_scale_ref is not None and self.log_scale_ref < 2:
            raise ValueError(f"log_scale_ref must be >= 2, got {self.log_scale_ref}")
        scalings = [name for name in ("linear_factor", "llama3_factor", "yarn") if getattr(self, name) is not None]
        if len(scalings) > 1:
            raise ValueError(f"one RoPE scaling at a time, got {' and '.join(scalings)}")
        if self.yarn is not None and self.rotary_percent != 1.0:
            raise ValueError("megatron's YaRN rotates whole heads: rotary_percent must be 1 with yarn")
        if self.dynamic_ntk and (self.llama3_factor is not None or self.yarn is not None):
            raise ValueError(f"dynamic NTK rescales a plain base; it does not combine with {scalings[0]}")

    def describe(self) -> str:
        """One line: the base and whatever scaling rides on it."""
        parts = [f"base {self.base:g}"]
        if self.linear_factor is not None:
            parts.append(f"linear interpolation x{self.linear_factor:g}")
        if self.llama3_factor is not None:
            parts.append(f"Llama-3 scaling x{self.llama3_factor:g}")
        if self.yarn is not None:
            parts.append(f"YaRN x{self.yarn.factor:g} from {self.yarn.original_len} "
                         f"(attention factor {self.yarn.attention_factor:.4g})")
        if self.dynamic_ntk:
            parts.append(f"dynamic NTK from {self.train_len}")
        if self.log_scale_ref is not None:
            parts.append(f"log-scaled attention from {self.log_scale_ref}")
        if self.rotary_percent != 1.0:
            parts.append(f"rotary {self.rotary_percent:g} of each head")
        return ", ".join(parts)


def _device() -> torch.device:
    """Where megatron's rotary tables go: the current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def dynamic_ntk_base(base: float, seq_len: int, train_len: int, rotary_dim: int, alpha: float = 1.0) -> float:
    """Dynamic NTK: beta' = beta * (alpha*L/T_train - (alpha-1))^(d/(d-2)) for L > T_train, else beta."""
    if seq_len <= train_len:
        return base
    return base * (alpha * seq_len / train_len - (alpha - 1)) ** (rotary_dim / (rotary_dim - 2))


def log_scale_factors(positions: torch.Tensor, t_ref: int) -> torch.Tensor:
    """Log-scaled attention: max(1, ln t / ln T_ref) for 1-based positions t = positions + 1."""
    t = positions.to(torch.float64) + 1
    return torch.clamp(torch.log(t) / math.log(t_ref), min=1.0)  # float64: the caller casts


class _DocumentTables:
    """Rotary tables per token for packed documents, for megatron's rotary embeddings below.

    GPTModel (0.19.2, _preprocess) asks its rotary embedding for ``get_rotary_seq_len(...,
    packed_seq_params)`` and then, at once, for the table; it passes no positions. So the first call
    notes the micro batch's Documents (local layout: qkv_format "sbhd") and the second builds the table
    from their positions: [s, b, 1, d] angles, which megatron's unfused RoPE applies to [s, b, h, d]
    queries and keys by broadcasting. Other calls get megatron's table of positions 0..L-1.

    The class it is mixed into provides ``full_table(length)``: [length, 1, 1, d] angles of positions
    0..length-1 (dynamic NTK's base for ``length``), not CP-sliced.
    """

    documents: Documents | None = None

    def get_rotary_seq_len(self, inference_context, transformer, transformer_input, transformer_config,
                           packed_seq_params=None, **kwargs) -> int:
        local = isinstance(packed_seq_params, Documents) and packed_seq_params.qkv_format == "sbhd"
        self.documents = packed_seq_params if local else None
        return super().get_rotary_seq_len(inference_context, transformer, transformer_input, transformer_config,
                                          packed_seq_params, **kwargs)

    def take_documents(self) -> Documents | None:
        documents, self.documents = self.documents, None
        return documents

    def document_table(self, documents: Documents) -> torch.Tensor:
        """[s, b, 1, d]: each token's angles at its own position, dynamic NTK's base from its span's length
        (Documents.lengths: the document's own length when positions restart at each one)."""
        positions, lengths = documents.positions, documents.lengths
        if not getattr(self.rope, "dynamic_ntk", False):
            table = self.full_table(max(documents.table_lengths))[:, 0, 0]
            return table[positions].transpose(0, 1)[:, :, None]
        angles = None
        for length in documents.table_lengths:  # one table per distinct length: few (documents of a micro batch)
            table = self.full_table(length)[:, 0, 0]
            part = table[positions.clamp(max=length - 1)]
            mask = (lengths == length)[..., None]
            angles = torch.where(mask, part, angles) if angles is not None else torch.where(mask, part, 0.0)
        return angles.transpose(0, 1)[:, :, None]


class RotaryEmbedding(_DocumentTables, _McoreRotary):
    """megatron-core's rotary table with dynamic NTK and device-agnostic CP slicing.

    GPTModel asks for the table with the global sequence length (it multiplies by CP itself);
    we size dynamic NTK's base by that length, then keep only this rank's chunks.
    """

    def __init__(self, rope: RopeConfig, kv_channels: int, cp_group=None):
        super().__init__(
            kv_channels=kv_channels,
            rotary_percent=rope.rotary_percent,
            seq_len_interpolation_factor=rope.linear_factor,
            rotary_base=rope.base,
            use_cpu_initialization=True,
            cp_group=cp_group,
        )
        if rope.llama3_factor is not None:  # megatron's Llama-3 scaling, with all four of its numbers
            self.inv_freq = self._apply_scaling(self.inv_freq, factor=rope.llama3_factor,
                                                low_freq_factor=rope.llama3_low_freq_factor,
                                                high_freq_factor=rope.llama3_high_freq_factor,
                                                original_max_position_embeddings=rope.llama3_original_len)
        self.rope = rope
        self.rotary_dim = self.inv_freq.numel() * 2
        self._table_key = self._table = None

    def inv_freq_for(self, seq_len: int) -> torch.Tensor:
        if not self.rope.dynamic_ntk:
            return self.inv_freq
        base = dynamic_ntk_base(self.rope.base, seq_len, self.rope.train_len, self.rotary_dim, self.rope.ntk_alpha)
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=self.inv_freq.device)
        return 1.0 / (base ** (exponents / self.rotary_dim))

    def full_table(self, length: int) -> torch.Tensor:
        return self._table_for(length, 0, True, None, _device())

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> torch.Tensor:
        """The table of this rank's positions; the last one is kept, as megatron caches its own (a training
        step asks for the same table every micro batch). A table made under inference_mode cannot be saved
        for a backward pass, so the mode is part of the key. With packed documents: each token's (see
        _DocumentTables)."""
        documents = self.take_documents()
        if documents is not None:
            return self.document_table(documents)
        device = _device()
        cp_group = cp_group if cp_group is not None else self.cp_group
        key = (max_seq_len, offset, packed_seq, cp_group, device, torch.is_inference_mode_enabled())
        if self._table_key != key:
            self._table_key, self._table = key, self._table_for(max_seq_len, offset, packed_seq, cp_group, device)
        return self._table

    def _table_for(self, max_seq_len: int, offset: int, packed_seq: bool, cp_group, device) -> torch.Tensor:
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        positions = torch.arange(max_seq_len, device=self.inv_freq.device, dtype=torch.float32) + offset
        if self.seq_len_interpolation_factor is not None:
            positions = positions / self.seq_len_interpolation_factor
        if cp_group is not None and cp_group.size() > 1 and not packed_seq:
            positions = positions[cp_local_positions(max_seq_len, cp_group.size(), cp_group.rank(), positions.device)]
        freqs = torch.outer(positions, self.inv_freq_for(max_seq_len + offset))
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


class YarnRotaryEmbedding(_DocumentTables, _McoreYarn):
    """megatron-core's YaRN table (its frequencies, ramp and temperature) with device-agnostic CP slicing.

    Returns (angles, temperature) as megatron's own does; GPTModel's "yarn" path keeps the angles, and
    megatron's attention applies the temperature from the config (Yarn.megatron_config).
    """

    def __init__(self, rope: RopeConfig, kv_channels: int, cp_group=None):
        yarn = rope.yarn
        super().__init__(
            kv_channels=kv_channels,
            rotary_percent=rope.rotary_percent,
            rotary_base=rope.base,
            use_cpu_initialization=True,
            scaling_factor=yarn.factor,
            original_max_position_embeddings=yarn.original_len,
            beta_fast=yarn.beta_fast,
            beta_slow=yarn.beta_slow,
            mscale=yarn.mscale,
            mscale_all_dim=yarn.mscale_all_dim,
            correction_range_round_to_int=yarn.truncate,
            cp_group=cp_group,
        )
        self.rope = rope

    def full_table(self, length: int) -> torch.Tensor:
        return self._sliced(length, 0, True, None)[0]

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group=None) -> tuple[torch.Tensor, float]:
        documents = self.take_documents()
        if documents is not None:
            return self.document_table(documents), self._sliced(max(documents.table_lengths), 0, True, None)[1]
        return self._sliced(max_seq_len, offset, packed_seq, cp_group)

    @functools.lru_cache(maxsize=32)  # as megatron's own forward
    def _sliced(self, max_seq_len: int, offset: int, packed_seq: bool, cp_group) -> tuple[torch.Tensor, float]:
        emb, temperature = self.get_emb(max_seq_len, offset)
        cp_group = cp_group if cp_group is not None else self.cp_group
        if cp_group is not None and cp_group.size() > 1 and not packed_seq:
            emb = emb[cp_local_positions(max_seq_len, cp_group.size(), cp_group.rank(), emb.device)]
        return emb, temperature

    forward.cache_clear = _sliced.cache_clear  # megatron's __init__ clears its forward's cache


def rotary_embedding(rope: RopeConfig, kv_channels: int, cp_group=None) -> torch.nn.Module:
    """The rotary table a model with this RoPE configuration uses."""
    cls = YarnRotaryEmbedding if rope.yarn is not None else RotaryEmbedding
    return cls(rope, kv_channels, cp_group)
