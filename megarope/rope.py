"""RoPE configuration and the paper's evaluation-time variants, with global positions under CP.

Under context parallelism megatron splits each sequence into 2*CP chunks and gives rank r the
chunks r and 2*CP-1-r (load balancing for causal attention). Everything position-dependent here
(the rotary table, dynamic NTK's length, log-scaled queries) is computed from *global* positions,
so a CP=N run sees exactly what a CP=1 run sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding as _McoreRotary

from megarope.parallel import cp_local_positions


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
        passed through to it unchanged.
    """

    base: float = 10000.0
    rotary_percent: float = 1.0
    train_len: int = 4096
    dynamic_ntk: bool = False
    ntk_alpha: float = 1.0
    log_scale_ref: int | None = None
    linear_factor: float | None = None
    llama3_factor: float | None = None

    def __post_init__(self):
        if not self.base > 1:
            raise ValueError(f"rope base must be > 1, got {self.base}")
        if not 0 < self.rotary_percent <= 1:
            raise ValueError(f"rotary_percent must be in (0, 1], got {self.rotary_percent}")
        if self.log_scale_ref is not None and self.log_scale_ref < 2:
            raise ValueError(f"log_scale_ref must be >= 2, got {self.log_scale_ref}")


def dynamic_ntk_base(base: float, seq_len: int, train_len: int, rotary_dim: int, alpha: float = 1.0) -> float:
    """Dynamic NTK: beta' = beta * (alpha*L/T_train - (alpha-1))^(d/(d-2)) for L > T_train, else beta."""
    if seq_len <= train_len:
        return base
    return base * (alpha * seq_len / train_len - (alpha - 1)) ** (rotary_dim / (rotary_dim - 2))


def log_scale_factors(positions: torch.Tensor, t_ref: int) -> torch.Tensor:
    """Log-scaled attention: max(1, ln t / ln T_ref) for 1-based positions t = positions + 1."""
    t = positions.to(torch.float64) + 1
    return torch.clamp(torch.log(t) / math.log(t_ref), min=1.0)  # float64: the caller casts


class RotaryEmbedding(_McoreRotary):
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
            rope_scaling=rope.llama3_factor is not None,
            rope_scaling_factor=rope.llama3_factor or 8.0,
            use_cpu_initialization=True,
            cp_group=cp_group,
        )
        self.rope = rope
        self.rotary_dim = self.inv_freq.numel() * 2

    def inv_freq_for(self, seq_len: int) -> torch.Tensor:
        if not self.rope.dynamic_ntk:
            return self.inv_freq
        base = dynamic_ntk_base(self.rope.base, seq_len, self.rope.train_len, self.rotary_dim, self.rope.ntk_alpha)
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=self.inv_freq.device)
        return 1.0 / (base ** (exponents / self.rotary_dim))

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> torch.Tensor:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        positions = torch.arange(max_seq_len, device=self.inv_freq.device, dtype=torch.float32) + offset
        if self.seq_len_interpolation_factor is not None:
            positions = positions / self.seq_len_interpolation_factor
        cp_group = cp_group if cp_group is not None else self.cp_group
        if cp_group is not None and cp_group.size() > 1 and not packed_seq:
            positions = positions[cp_local_positions(max_seq_len, cp_group.size(), cp_group.rank(), positions.device)]
        freqs = torch.outer(positions, self.inv_freq_for(max_seq_len + offset))
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
