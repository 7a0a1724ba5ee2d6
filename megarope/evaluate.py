"""Long-context evaluation: perplexity, loss, next-token accuracy and loss by position, per length.

A *run* is one (checkpoint, variant) pair; a variant is how RoPE is applied at evaluation time
("as-trained", "dynamic-ntk", "log-scaled", or several joined with "+", e.g.
"dynamic-ntk+log-scaled"; "base=B" evaluates at another base). RoPE has no weights, so every
variant loads the same checkpoint with other RoPE settings (checkpoint.build_from_checkpoint's
rope_overrides). Runs are named "<checkpoint basename>:<variant>".

What is scored
--------------
Every document is tokenized with the model's tokenizer (the sentencepiece BOS is put first when
the tokenizer has one, as LLaMA was trained; ``bos=False`` turns that off) and truncated at each
length L: the model reads tokens 0..L-1 and predicts tokens 1..L-1, so L-1 tokens are scored per
document (what ``transformers`` computes with ``labels=input_ids``). A document shorter than L is
skipped for that length and counted in ``n_skipped``; ``max_docs`` scores at most the first N
long-enough documents per length. Per position, the loss is averaged over documents; a length's
loss is the mean over all scored positions of all documents, ppl = exp(loss). Position buckets
are log-spaced over the *target* position t (the token predicted from t tokens of context):
[0, L0), [L0, 2*L0), [2*L0, 4*L0), ... (L0 = ``bucket0``, 128 by default).

Sliding window (``window=W``): no token is predicted from more than W tokens of context. Windows
of W tokens start every ``stride`` tokens (W/2 by default; the last window is aligned to end at
the document's L-th token); each window is a fresh sequence with positions 0..W-1, and scores only
the targets that no earlier window scored (the first window scores all of its W-1). Every target
after the first window thus sees between W-stride and W-1 tokens of context, never more, and the
model never sees a position beyond W-1 -- the usual baseline for "no extrapolation at all".
Buckets still use the token's position in the document. Cost: about L/stride forward passes of W.

Scale
-----
``score_sequences`` runs under torch.inference_mode. The sequence is split across the CP group
(parallel.slice_for_cp with global position ids: rank r keeps chunks r and 2*CP-1-r), each rank
scores its own tokens, and the per-token results are all-gathered back into global order. The loss
comes from loss.token_losses, which never builds the [sequence x vocab] logits (4096-token chunks).
With CP=1 on one GPU the local backend's core attention is SDPA with is_causal (flash: O(S) memory);
under CP it processes queries in blocks of 1024 against the gathered K/V prefix. Under no_grad the
decoder runs layer by layer and each layer's activations are freed before the next starts, so the
peak is one layer's working set on top of the residual stream. The MLP is the widest part of a
layer (fc1 out 2*ffn, silu, the linear half, the product: about 5*ffn values per token), and it is
per-token, so ``score_sequences`` runs each MLP over sequence chunks of ``mlp_chunk`` tokens
(exact: nothing mixes tokens there).

How ``llama-1b`` (22 layers, hidden 2048, GQA with 4 KV groups of 64, ffn 5632, vocab 32000)
evaluates 1M tokens on one 80 GB GPU in bf16 (``estimate_eval_memory(get_preset("llama-1b"), 2**20, 2)``,
an estimate that counts tensors, not a measurement; allow ~10-20 % for the allocator):
  weights                                 2.2 GB
  residual stream (layer input + normed)  2 x 1M x 2048 x 2 B            =  8.6 GB
  attention phase (one layer):  qkv 1M x 2560, RoPE'd q/k and RoPE temporaries, core output:
                                about 1M x 11000 x 2 B                    = 23.1 GB
  (K/V themselves are 1M x 2 x 256 x 2 B = 1.1 GB per layer; no KV cache is kept across layers)
  MLP phase, chunked by 32K tokens: 32K x 5 x 5632 x 2 B + the 1M x 2048 output = 6.1 GB
    (unchunked it would be 1M x 5 x 5632 x 2 B = 59 GB: the reason for chunking)
  loss chunk: 4096 x 32000 logits in fp32, x3 temporaries                  =  1.6 GB
  rotary table (fp32 cos/sin) and token ids                                =  0.7 GB
  peak ~ weights + residual + max(attention, MLP, loss) + table           = 34.6 GB
so a single H100 80GB holds 1M tokens with room to spare, and about 2M before it is full; beyond
that, CP splits the sequence (the estimate takes ``cp``). Compute is the real limit at 1M: the
attention is ~ 4 * 22 layers * 2048 * (1M)^2 / 2 FLOPs ~ 1e17, minutes on one H100.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megarope import loss as loss_mod
from megarope import parallel, scaling
from megarope.attention import QUERY_BLOCK, gather_sequence
from megarope.errors import UsageError
from megarope.files import atomic_files, write_json_atomic
from megarope.units import format_tokens

DEFAULT_BUCKET0 = 128
MLP_CHUNK = 32768         # tokens per MLP call in score_sequences (exact; bounds the widest activation)
BATCH_TOKENS = 16384      # short sequences are batched up to this many tokens per forward pass
VARIANT_PARTS = ("as-trained", "dynamic-ntk", "log-scaled")


# ----------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """How RoPE is applied at evaluation time; None fields keep what the checkpoint records."""

    name: str
    dynamic_ntk: bool = False
    log_scaled: bool = False
    log_scale_ref: int | None = None  # T_ref; None: the checkpoint's RoPE train_len (its tuning length)
    base: float | None = None

    def rope_overrides(self, rope: dict) -> dict:
        out = {}
        if self.base is not None:
            out["base"] = float(self.base)
        if self.dynamic_ntk:
            out["dynamic_ntk"] = True
        if self.log_scaled:
            ref = self.log_scale_ref if self.log_scale_ref is not None else int(rope["train_len"])
            if ref < 2:
                raise UsageError(f"log-scaled attention needs T_ref >= 2, got {ref}")
            out["log_scale_ref"] = ref
        return out


def parse_variant(text: str, rope_base: float | None = None, log_scale_ref: int | None = None) -> Variant:
    """"as-trained", "dynamic-ntk", "log-scaled", "base=B", or several of the last three joined by "+"."""
    parts = [p.strip() for p in text.split("+") if p.strip()]
    if not parts:
        raise UsageError(f"empty variant {text!r}")
    dynamic = log = False
    base = rope_base
    for part in parts:
        if part == "as-trained" and len(parts) == 1:
            continue
        if part == "dynamic-ntk":
            dynamic = True
        elif part == "log-scaled":
            log = True
        elif part.startswith("base="):
            try:
                base = float(part[5:])
            except ValueError:
                raise UsageError(f"variant {text!r}: {part[5:]!r} is not a number") from None
            if not base > 1:
                raise UsageError(f"variant {text!r}: the RoPE base must be > 1")
        else:
            raise UsageError(f"unknown variant {part!r} in {text!r}; use {', '.join(VARIANT_PARTS)}, base=B, "
                             f"or several joined by '+'")
    name = "+".join(p for p in parts if p != "as-trained") or "as-trained"
    if rope_base is not None and not any(p.startswith("base=") for p in parts):
        name = f"{name}+base={rope_base:g}" if name != "as-trained" else f"base={rope_base:g}"
    if log and log_scale_ref is not None:
        name = name.replace("log-scaled", f"log-scaled({log_scale_ref})")
    return Variant(name, dynamic, log, log_scale_ref if log else None, base)


def variants_from_flags(variants: Sequence[str] | None, rope_base: float | None = None, dynamic_ntk: bool = False,
                        log_scale_ref: int | None = None) -> list[Variant]:
    """The CLI's rule: --variants lists them; without it, --dynamic-ntk/--log-scale make the one variant."""
    if variants:
        if dynamic_ntk:
            raise UsageError("--dynamic-ntk applies to a single variant; with --variants, name it there "
                             "(e.g. --variants as-trained,dynamic-ntk)")
        out = [v if isinstance(v, Variant) else parse_variant(v, rope_base, log_scale_ref) for v in variants]
        if log_scale_ref is not None and not any(v.log_scaled for v in out):
            raise UsageError("--log-scale T_REF sets the T_ref of log-scaled variants, and --variants has none")
    else:
        parts = ["dynamic-ntk"] * dynamic_ntk + ["log-scaled"] * (log_scale_ref is not None)
        out = [parse_variant("+".join(parts) or "as-trained", rope_base, log_scale_ref)]
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise UsageError(f"variants repeat: {', '.join(names)}")
    return out


# ----------------------------------------------------------------------------------------------- memory
def estimate_eval_memory(preset, length: int, dtype_bytes: int = 2, tp: int = 1, cp: int = 1,
                         loss_chunk: int = loss_mod.DEFAULT_CHUNK, mlp_chunk: int | None = MLP_CHUNK,
                         query_block: int = QUERY_BLOCK) -> dict[str, int]:
    """Bytes per rank that scoring one ``length``-token sequence needs, by part, and the ``peak``.

    Counts the tensors alive at the widest moment of each phase of one layer (no_grad: one layer's
    activations at a time) on top of the weights and the residual stream; see the module docstring.
    An estimate: allocator overhead and fragmentation are not included.
    """
    b, s = dtype_bytes, length // cp
    h, ffn, hd = preset.hidden_size, preset.ffn_hidden_size, preset.head_dim
    qd, kvd, vocab = preset.num_heads * hd, preset.num_query_groups * hd, preset.padded_vocab_size
    layer_params = h * (qd + 2 * kvd) + qd * h + h * 2 * ffn + ffn * h
    params = preset.num_layers * (layer_params / tp + 2 * h) + 2 * vocab * h / tp + h
    # qkv out, RoPE'd q and k, ~2 q-sized RoPE temporaries (rotate_half, products), the core output
    attention = b * s / tp * ((qd + 2 * kvd) + (qd + kvd) + 2 * qd + qd)
    if cp > 1:  # K/V gathered from the whole CP group; one query block's causal mask (bool) and the additive
        # bias SDPA makes of it (fp32 on CPU, measured; the memory-efficient CUDA kernel streams the scores)
        attention += b * length * 2 * kvd / tp + query_block * length * (4 + 1)
    chunk = s if not mlp_chunk else min(s, mlp_chunk)
    mlp = b * chunk * 5 * ffn / tp + (b * s * h if chunk < s else 0)  # chunk outputs gathered into one
    loss_phase = min(s, loss_chunk) * (vocab / tp * 4 * 3 + h * 4)
    parts = {
        "weights": int(params * b),
        "residual": int(2 * b * s * h),
        "attention": int(attention),
        "mlp": int(mlp),
        "loss": int(loss_phase),
        "rotary_and_ids": int((length * hd / 2 + 2 * s * hd) * 4 + 3 * s * 8 + s * 5),
    }
    parts["peak"] = (parts["weights"] + parts["residual"] + max(parts["attention"], parts["mlp"], parts["loss"])
                     + parts["rotary_and_ids"])
    return parts


# ----------------------------------------------------------------------------------------------- scoring
@contextlib.contextmanager
def chunked_mlp(model, chunk: int | None):
    """Run every MLP of ``model`` over sequence chunks of ``chunk`` tokens (exact: the MLP is per token)."""
    from megatron.core.transformer.mlp import MLP

    patched = []
    if chunk:
        for module in model.modules():
            if isinstance(module, MLP) and "forward" not in module.__dict__:
                original = module.forward

                def forward(hidden_states, *args, _original=original, **kwargs):
                    # TransformerLayer passes padding_mask=None; anything per-token (a padding mask, MoE's
                    # per_token_scale) would need chunking too, so then run unchunked
                    if args or any(v is not None for v in kwargs.values()) or hidden_states.shape[0] <= chunk:
                        return _original(hidden_states, *args, **kwargs)
                    outs = [_original(hidden_states[i:i + chunk], **kwargs)
                            for i in range(0, hidden_states.shape[0], chunk)]
                    return torch.cat([o for o, _ in outs]), outs[0][1]  # the bias (None for LLaMA) is not per token

                module.forward = forward
                patched.append(module)
    try:
        yield model
    finally:
        for module in patched:
            del module.forward


def _model_parallel_sizes() -> tuple[int, int]:
    if not parallel_state.model_parallel_is_initialized():
        return 1, 1
    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_context_parallel_world_size()


def score_sequences(model, token_ids: torch.Tensor, chunk: int = loss_mod.DEFAULT_CHUNK,
                    batch_tokens: int = BATCH_TOKENS, mlp_chunk: int | None = MLP_CHUNK):
    """Per-position next-token loss and correctness of ``token_ids`` [n, L] (the same on every rank of
    a model-parallel group), in global order on every rank.

    Returns (loss [n, L-1] float32, correct [n, L-1] bool) on the CPU: column i is the prediction of
    token i+1 from tokens 0..i. Under CP each rank scores its two chunks of the sequence and the
    results are all-gathered over the CP group and put back in natural order.
    """
    if token_ids.dim() != 2 or token_ids.shape[1] < 2:
        raise ValueError(f"token_ids must be [n, L] with L >= 2, got {tuple(token_ids.shape)}")
    n, length = token_ids.shape
    tp, cp = _model_parallel_sizes()
    if length % (2 * cp):
        raise ValueError(f"sequence length {length} is not divisible by 2*CP = {2 * cp}")
    group = parallel_state.get_context_parallel_group() if cp > 1 else None
    device = parallel.device()
    per_batch = max(1, batch_tokens // length)
    losses, correct = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), chunked_mlp(model, mlp_chunk):
            positions = torch.arange(length, device=device)
            for start in range(0, n, per_batch):
                tokens = token_ids[start:start + per_batch].to(device=device, dtype=torch.long)
                rows = tokens.shape[0]
                labels = torch.roll(tokens, -1, dims=1)  # the last label wraps around: scored, then dropped
                batch = {"tokens": tokens, "labels": labels, "position_ids": positions.expand(rows, -1)}
                if cp > 1:
                    batch = parallel.slice_for_cp(batch)
                lo, ok = loss_mod.token_losses(model, batch["tokens"], batch["labels"], batch["position_ids"], chunk)
                lo, ok = lo.float(), ok.float()
                if cp > 1:  # [rows, s_local] -> [S, rows] in natural order -> [rows, S]
                    lo = gather_sequence(lo.t().contiguous(), group).t()
                    ok = gather_sequence(ok.t().contiguous(), group).t()
                losses.append(lo[:, :-1].cpu())
                correct.append(ok[:, :-1].cpu() > 0.5)
    finally:
        model.train(was_training)
    return torch.cat(losses), torch.cat(correct)


def window_plan(length: int, window: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Sliding windows over a ``length``-token sequence: (start, first target scored) per window.

    Window k reads tokens [start, start+window) and scores targets first..start+window-1.
    """
    stride = window // 2 if stride is None else stride
    if window < 2 or not 0 < stride < window:  # windows must overlap: a window cannot predict its own first token
        raise ValueError(f"need window >= 2 and 0 < stride < window, got window {window}, stride {stride}")
    if window >= length:
        return [(0, 1)]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    plan, next_target = [], 1
    for start in starts:
        plan.append((start, next_target))
        next_target = start + window
    return plan


def score_windowed(model, ids: torch.Tensor, window: int, stride: int | None = None, **kwargs):
    """Sliding-window scores of one sequence ``ids`` [L]: (loss [L-1], correct [L-1]), like score_sequences."""
    length = ids.shape[0]
    plan = window_plan(length, window, stride)
    if len(plan) == 1:
        lo, ok = score_sequences(model, ids[None, :length], **kwargs)
        return lo[0], ok[0]
    lo, ok = score_sequences(model, torch.stack([ids[s:s + window] for s, _ in plan]), **kwargs)
    loss_out, correct_out = torch.empty(length - 1), torch.empty(length - 1, dtype=torch.bool)
    for k, (start, first) in enumerate(plan):
        # column j of window k predicts target start+j+1; keep targets first..start+window-1
        loss_out[first - 1:start + window - 1] = lo[k, first - start - 1:]
        correct_out[first - 1:start + window - 1] = ok[k, first - start - 1:]
    return loss_out, correct_out


def bucket_edges(length: int, first: int = DEFAULT_BUCKET0) -> list[int]:
    """[0, L0, 2*L0, 4*L0, ..., length]: log-spaced target-position buckets."""
    edges, edge = [0], first
    while edge < length:
        edges.append(edge)
        edge *= 2
    return edges + [length]


def summarize(loss_sum: torch.Tensor, correct_sum: torch.Tensor, n_docs: int, bucket0: int = DEFAULT_BUCKET0,
              positions: bool = False) -> dict:
    """Per-position sums over ``n_docs`` documents ([L-1], index t-1 = target t) -> the record's numbers.

    With ``positions``, also "position_loss": the mean loss at every target position (index t-1 = target t).
    """
    length = loss_sum.shape[0] + 1
    if n_docs == 0:
        nan = float("nan")
        return {"loss": nan, "ppl": nan, "accuracy": nan, "n_tokens": 0, "buckets": [],
                **({"position_loss": []} if positions else {})}
    mean_loss = float(loss_sum.sum()) / (n_docs * (length - 1))
    buckets = []
    edges = bucket_edges(length, bucket0)
    for lo, hi in zip(edges[:-1], edges[1:]):
        a, b = max(lo, 1) - 1, hi - 1  # targets max(lo,1)..hi-1
        if b <= a:
            continue
        bl = float(loss_sum[a:b].sum()) / (n_docs * (b - a))
        buckets.append({"start": lo, "end": hi, "loss": bl, "ppl": _exp(bl),
                        "accuracy": float(correct_sum[a:b].sum()) / (n_docs * (b - a)), "n_tokens": n_docs * (b - a)})
    out = {"loss": mean_loss, "ppl": _exp(mean_loss),
           "accuracy": float(correct_sum.sum()) / (n_docs * (length - 1)),
           "n_tokens": n_docs * (length - 1), "buckets": buckets}
    if positions:
        out["position_loss"] = (loss_sum / n_docs).tolist()
    return out


def measured_break(position_loss: Sequence[float], train_len: int, rise: float = 1.0) -> int | None:
    """Where a model breaks: the first target position p >= ``train_len`` at which the loss, averaged
    over a quarter-octave window around p ([p / 2^(1/8), p * 2^(1/8)]), is

      * at least ``rise`` nats above the in-length level (the mean loss over targets train_len/2 ..
        train_len-1), and
      * at least ``rise`` nats above the same windowed loss one octave earlier, at p/2.

    The first condition says the model has lost what it could do inside its training length; the
    second that it lost it abruptly (a cliff, as past the bound of eq. 16b) rather than by the slow,
    smooth rise of a base below beta_3, which never counts as a break. None when there is no such p.
    ``position_loss`` is a record's per-position curve (index t-1 = target t; run(..., positions=True)).
    """
    curve = torch.as_tensor(list(position_loss), dtype=torch.float64)
    n = curve.numel()
    if train_len < 2 or n < train_len:
        raise ValueError(f"need a curve of at least train_len = {train_len} positions, got {n}")
    sums = torch.cat([torch.zeros(1, dtype=torch.float64), curve.cumsum(0)])

    def windowed(p: int) -> float:  # mean over targets lo..hi (1-based), clipped to the curve
        lo, hi = max(1, math.floor(p / 2 ** 0.125)), min(n, math.ceil(p * 2 ** 0.125))
        return float(sums[hi] - sums[lo - 1]) / (hi - lo + 1)

    baseline = float(curve[train_len // 2 - 1:train_len - 1].mean())
    for p in range(train_len, n + 1):
        level = windowed(p)
        if level >= baseline + rise and level - windowed(p // 2) >= rise:
            return p
    return None


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


# ----------------------------------------------------------------------------------------------- data
def _looks_like_path(item) -> bool:
    if isinstance(item, os.PathLike):
        return True
    return isinstance(item, str) and "\n" not in item and len(item) < 4096 and (
        os.path.exists(item) or (" " not in item and item.endswith((".txt", ".jsonl", ".json"))))


def load_texts(docs_or_paths: Sequence) -> list[str]:
    """Document strings from paths (.txt, .jsonl with "text", directories) and/or the texts themselves.

    An item is a path when it is a PathLike, names an existing file or directory, or is a single
    word ending in .txt/.jsonl/.json (then a missing file is an error); anything else is a document.
    """
    from megarope import data

    if isinstance(docs_or_paths, (str, os.PathLike)):
        docs_or_paths = [docs_or_paths]
    texts = []
    for item in docs_or_paths:
        texts += list(data.iter_documents([item])) if _looks_like_path(item) else [str(item)]
    if not texts:
        raise UsageError("no documents to evaluate")
    return texts


def tokenize(texts: Sequence[str], tokenizer, max_len: int | None = None, bos: bool = True) -> list[torch.Tensor]:
    """Token ids of each document (BOS first when the tokenizer has one and ``bos``), cut at ``max_len``."""
    out = []
    for text in texts:
        ids = tokenizer.encode(text)
        if bos and getattr(tokenizer, "bos", None) is not None:
            ids = [tokenizer.bos] + ids
        out.append(torch.tensor(ids[:max_len] if max_len else ids, dtype=torch.int32))
    return out


def _file_digest(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def resolve_tokenizer(checkpoint_dir: str, meta: dict, tokenizer=None):
    """The tokenizer to evaluate ``checkpoint_dir`` with, checked against the model.

    ``tokenizer`` ("bytes", a .model path, or None for the checkpoint's own). It must not have more
    tokens than the model's vocabulary, and when the checkpoint records a tokenizer, a different one
    (another vocabulary size, or another sentencepiece file's contents) is refused.
    """
    from megarope import checkpoint, data

    own = checkpoint.tokenizer_path(checkpoint_dir)
    if tokenizer is None:
        if own is None:
            raise UsageError(f"checkpoint {checkpoint_dir} records no tokenizer: pass --tokenizer (bytes or a .model)")
        tok = data.load_tokenizer(own)
    else:
        tok = data.load_tokenizer(tokenizer)
        if own is not None:
            recorded = data.load_tokenizer(own)
            same = recorded.vocab_size == tok.vocab_size and (
                recorded.path is None and tok.path is None and recorded.name == tok.name
                or recorded.path is not None and tok.path is not None
                and _file_digest(recorded.path) == _file_digest(tok.path))
            if not same:
                raise UsageError(f"tokenizer {tokenizer} ({tok.vocab_size} tokens) does not match the one "
                                 f"checkpoint {checkpoint_dir} records ({recorded.spec}, {recorded.vocab_size} tokens)")
    model_vocab = meta["preset"]["vocab_size"]
    if tok.vocab_size > model_vocab:
        raise UsageError(f"tokenizer {tok.spec} has {tok.vocab_size} tokens but the model of {checkpoint_dir} "
                         f"has a vocabulary of {model_vocab}: not this model's tokenizer")
    return tok


# ----------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    name: str
    checkpoint: str
    variant: Variant
    meta: dict
    tokenizer: object

    @property
    def rope(self) -> dict:
        return {**self.meta["rope"], **self.variant.rope_overrides(self.meta["rope"])}


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory; a training run's root stands for its latest complete step."""
    from megarope import checkpoint

    if not os.path.isfile(os.path.join(path, checkpoint.META)) and os.path.isdir(path):
        latest = checkpoint.latest_checkpoint(path)
        if latest is not None:
            return latest
    checkpoint.read_meta(path)  # the one-line error for anything else
    return path


def checkpoint_labels(checkpoints: Sequence[str]) -> list[str]:
    """Short readable names: the basename (with its parent for a training step directory), or as many
    trailing path parts as make them unique."""
    parts = [os.path.normpath(os.path.abspath(c)).split(os.sep) for c in checkpoints]
    first = 2 if any(p[-1].startswith("step_") for p in parts) else 1
    for depth in range(first, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label}#{i}" for i, label in enumerate(labels)]


def pretraining_of(meta: dict) -> tuple[int, float]:
    """(T_train, pretraining base) for the scaling law: what the model was *originally* trained with.

    An explicit meta "pretrain_len"/"pretrain_base" wins; otherwise the preset's max_seq_len (a converted
    HF checkpoint stores max_position_embeddings there) and, for a converted checkpoint, its rope_theta,
    else LLaMA's 10000.
    """
    train_len = int(meta.get("pretrain_len") or meta["preset"]["max_seq_len"])
    base = meta.get("pretrain_base")
    if base is None and meta.get("source") == "hf":
        cfg = meta.get("hf_config") or {}
        base = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    return train_len, float(base or scaling.LLAMA_PRETRAIN_BASE)


def predicted_bound(meta: dict, base: float) -> tuple[float | None, str | None]:
    """Theorem 3's extrapolation bound for evaluating at ``base`` (None where it gives none or cannot apply)."""
    preset = meta["preset"]
    head_dim = preset["hidden_size"] // preset["num_heads"]
    train_len, pretrain_base = pretraining_of(meta)
    tune_len = max(int(meta["rope"]["train_len"]), train_len)
    try:
        plan = scaling.plan_base(head_dim, train_len, base, tune_len, pretrain_base)
    except ValueError:
        return None, None
    return plan.extrapolation_bound, plan.regime


def plan_runs(checkpoints: Sequence[str], variants: Sequence[Variant], tokenizer=None) -> list[Run]:
    from megarope import checkpoint

    if not checkpoints:
        raise UsageError("no checkpoint to evaluate")
    labels = checkpoint_labels(checkpoints)
    checkpoints = [resolve_checkpoint(c) for c in checkpoints]
    if len(set(map(os.path.abspath, checkpoints))) != len(checkpoints):
        raise UsageError("a checkpoint is given twice")
    metas = [checkpoint.read_meta(c) for c in checkpoints]
    tokenizers = [resolve_tokenizer(c, m, tokenizer) for c, m in zip(checkpoints, metas)]
    runs = []
    for label, ckpt, meta, tok in zip(labels, checkpoints, metas, tokenizers):
        for variant in variants:
            run = Run(f"{label}:{variant.name}", ckpt, variant, meta, tok)
            _ = run.rope  # validate the overrides now, before any model is built
            runs.append(run)
    return runs


def _pick_backend(backend: str | None, meta: dict) -> str:
    import importlib.util

    backend = backend or meta.get("backend", "local")
    if backend == "te" and importlib.util.find_spec("transformer_engine") is None:
        if parallel.is_main():
            print("note: Transformer Engine is not installed here; evaluating with the local backend")
        backend = "local"
    return backend


def load_run_model(run: Run, backend: str | None = None, dtype: torch.dtype | None = None):
    """The run's model: its checkpoint, rebuilt with the run's RoPE variant, for the current parallel state."""
    from megarope import checkpoint

    dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    with warnings.catch_warnings():  # torch.distributed.checkpoint and megatron warn about CPU/world-of-one loads
        warnings.filterwarnings("ignore", module=r"(torch\.distributed\.checkpoint|megatron)")
        return checkpoint.build_from_checkpoint(run.checkpoint, backend=_pick_backend(backend, run.meta),
                                                rope_overrides=run.variant.rope_overrides(run.meta["rope"]),
                                                dtype=dtype)


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_lengths(lengths: Sequence[int], tp: int, cp: int, what: str = "length") -> list[int]:
    lengths = sorted(set(int(x) for x in lengths))
    if not lengths:
        raise UsageError("no lengths given")
    unit = 2 * cp * tp
    for length in lengths:
        if length < 2:
            raise UsageError(f"{what} {length} is too short (at least 2 tokens)")
        if length % unit:
            raise UsageError(f"{what} {length} is not divisible by 2*CP*TP = {unit}")
    return lengths


def _ensure_parallel(tp: int, cp: int) -> bool:
    """Initialize TP x CP (True) unless the caller already has (then the sizes must agree)."""
    if parallel_state.model_parallel_is_initialized():
        have = _model_parallel_sizes()
        if have != (tp, cp):
            raise UsageError(f"parallel state is TP {have[0]} x CP {have[1]}, asked for TP {tp} x CP {cp}")
        return False
    parallel.init(tp=tp, cp=cp)
    return True


def _dp() -> tuple[int, int, object]:
    return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_group())


def evaluate_model(model, docs: Sequence[torch.Tensor], lengths: Sequence[int], window: int | None = None,
                   stride: int | None = None, max_docs: int | None = None, bucket0: int = DEFAULT_BUCKET0,
                   progress: str | None = None, positions: bool = False, **score_kwargs) -> list[dict]:
    """Score ``docs`` (token id tensors) at each length; documents are split over data-parallel ranks.

    Returns one dict per length (loss, ppl, accuracy, n_docs, n_skipped, n_tokens, buckets, seconds, tokens_per_s).
    """
    from tqdm import tqdm

    if window is None and not model.megarope_rope.dynamic_ntk and len(lengths) > 1:
        return _evaluate_by_prefix(model, docs, lengths, max_docs, bucket0, progress, positions, **score_kwargs)
    dp_rank, dp_size, dp_group = _dp()
    results = []
    for length in lengths:
        eligible = [i for i, d in enumerate(docs) if d.shape[0] >= length]
        chosen = eligible[:max_docs] if max_docs else eligible
        mine = chosen[dp_rank::dp_size]
        loss_sum = torch.zeros(length - 1, dtype=torch.float64)
        correct_sum = torch.zeros(length - 1, dtype=torch.float64)
        started = time.perf_counter()
        bar = tqdm(total=len(chosen), desc=f"{progress or 'eval'} @ {length}", unit=" docs",
                   disable=None if parallel.is_main() and progress is not None else True, leave=False)
        if window is None or window >= length:
            per_batch = max(1, score_kwargs.get("batch_tokens", BATCH_TOKENS) // length)
            for k in range(0, len(mine), per_batch):
                ids = torch.stack([docs[i][:length] for i in mine[k:k + per_batch]])
                lo, ok = score_sequences(model, ids, **score_kwargs)
                loss_sum += lo.double().sum(0)
                correct_sum += ok.double().sum(0)
                bar.update(ids.shape[0] * dp_size)
        else:
            for i in mine:
                lo, ok = score_windowed(model, docs[i][:length], window, stride, **score_kwargs)
                loss_sum += lo.double()
                correct_sum += ok.double()
                bar.update(dp_size)
        bar.close()
        if dp_size > 1:
            both = torch.stack([loss_sum, correct_sum]).to(parallel.device())
            dist.all_reduce(both, group=dp_group)
            loss_sum, correct_sum = both.cpu()
        seconds = time.perf_counter() - started
        record = {"length": length, **summarize(loss_sum, correct_sum, len(chosen), bucket0, positions),
                  "n_docs": len(chosen), "n_skipped": len(docs) - len(eligible), "seconds": seconds}
        record["tokens_per_s"] = len(chosen) * length / seconds if seconds > 0 else float("nan")
        results.append(record)
    return results


def _evaluate_by_prefix(model, docs, lengths, max_docs, bucket0, progress, positions, **score_kwargs) -> list[dict]:
    """evaluate_model for several full-sequence lengths in one pass per document.

    Attention is causal, so a document truncated at L scores exactly the first L-1 targets of the
    same document read to a longer length -- unless RoPE depends on the length (dynamic NTK), which
    is why that variant is evaluated length by length. Each document is read once, at the longest
    length it is chosen for, and every shorter length takes that pass's prefix. ``seconds`` is then
    the time of the whole pass, shared by every length.
    """
    from tqdm import tqdm

    dp_rank, dp_size, dp_group = _dp()
    eligible = {L: [i for i, d in enumerate(docs) if d.shape[0] >= L] for L in lengths}
    chosen = {L: set(eligible[L][:max_docs] if max_docs else eligible[L]) for L in lengths}
    longest = {}
    for L in lengths:
        for i in chosen[L]:
            longest[i] = max(longest.get(i, 0), L)
    mine = sorted(longest)[dp_rank::dp_size]
    sums = {L: torch.zeros(2, L - 1, dtype=torch.float64) for L in lengths}
    started = time.perf_counter()
    bar = tqdm(total=len(longest), desc=f"{progress or 'eval'} @ {max(lengths)}", unit=" docs",
               disable=None if parallel.is_main() and progress is not None else True, leave=False)
    for read_len in sorted({longest[i] for i in mine}):
        group = [i for i in mine if longest[i] == read_len]
        per_batch = max(1, score_kwargs.get("batch_tokens", BATCH_TOKENS) // read_len)
        for k in range(0, len(group), per_batch):
            rows = group[k:k + per_batch]
            lo, ok = score_sequences(model, torch.stack([docs[i][:read_len] for i in rows]), **score_kwargs)
            for row, i in enumerate(rows):
                for L in lengths:
                    if i in chosen[L]:
                        sums[L][0] += lo[row, :L - 1].double()
                        sums[L][1] += ok[row, :L - 1].double()
            bar.update(len(rows) * dp_size)
    bar.close()
    seconds = time.perf_counter() - started
    read_tokens = sum(longest.values())
    results = []
    for L in lengths:
        if dp_size > 1:
            both = sums[L].to(parallel.device())
            dist.all_reduce(both, group=dp_group)
            sums[L] = both.cpu()
        record = {"length": L, **summarize(sums[L][0], sums[L][1], len(chosen[L]), bucket0, positions),
                  "n_docs": len(chosen[L]), "n_skipped": len(docs) - len(eligible[L]), "seconds": seconds,
                  "tokens_per_s": read_tokens / seconds if seconds > 0 else float("nan")}
        results.append(record)
    return results


def run(checkpoints: Sequence[str] | str, docs_or_paths: Sequence, lengths: Sequence[int],
        variants: Sequence[str | Variant] | None = None, out_dir: str | None = None, *, tokenizer: str | None = None,
        tp: int = 1, cp: int = 1, rope_base: float | None = None, dynamic_ntk: bool = False,
        log_scale_ref: int | None = None, window: int | None = None, stride: int | None = None,
        max_docs: int | None = None, bos: bool = True, bucket0: int = DEFAULT_BUCKET0, backend: str | None = None,
        dtype: torch.dtype | None = None, chunk: int = loss_mod.DEFAULT_CHUNK, mlp_chunk: int | None = MLP_CHUNK,
        batch_tokens: int = BATCH_TOKENS, positions: bool = False, verbose: bool = True) -> list[dict]:
    """Evaluate every (checkpoint, variant) at every length; returns the records (on every rank).

    Works in a plain process (it initializes TP x CP itself, world of one, and tears it down after) and
    under torchrun (the world is TP x CP x DP; documents are split over DP). With ``out_dir``, rank 0
    writes results.json, results.csv, ppl_vs_length.png and loss_by_position.png there. ``variants``
    defaults to the one that --rope-base/--dynamic-ntk/--log-scale describe (see variants_from_flags).
    ``positions`` adds each record's per-position mean loss curve ("position_loss", L-1 floats; see
    measured_break) -- to results.json too, so leave it off for very long lengths.
    """
    checkpoints = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
    checkpoints = [os.fspath(c) for c in checkpoints]
    lengths = check_lengths(lengths, tp, cp)
    if window is not None:
        check_lengths([window], tp, cp, "window")
        if stride is not None and not 0 < stride < window:
            raise UsageError(f"stride must be in 1..window-1 ({window - 1}), got {stride}")
    elif stride is not None:
        raise UsageError("stride needs a window")
    if max_docs is not None and max_docs < 1:
        raise UsageError(f"max_docs must be positive, got {max_docs}")
    if bucket0 < 1:
        raise UsageError(f"bucket0 must be positive, got {bucket0}")
    variant_list = variants_from_flags(variants, rope_base, dynamic_ntk, log_scale_ref)
    runs = plan_runs(checkpoints, variant_list, tokenizer)

    texts = load_texts(docs_or_paths)
    tokenized = {}  # one tokenization per distinct tokenizer
    for r in runs:
        key = r.tokenizer.spec
        if key not in tokenized:
            tokenized[key] = tokenize(texts, r.tokenizer, max(lengths), bos)
            longest = max(d.shape[0] for d in tokenized[key])
            too_long = [length for length in lengths if length > longest]
            if too_long:
                raise UsageError(f"length {too_long[0]} is longer than every document (the longest has {longest} "
                                 f"tokens with tokenizer {key})")

    own_init = _ensure_parallel(tp, cp)
    main = parallel.is_main()
    records = []
    try:
        for r in runs:
            model = load_run_model(r, backend, dtype)
            rope = model.megarope_rope
            bound, regime = predicted_bound(r.meta, rope.base)
            results = evaluate_model(model, tokenized[r.tokenizer.spec], lengths, window, stride, max_docs, bucket0,
                                     progress=r.name if verbose else None, positions=positions, chunk=chunk,
                                     mlp_chunk=mlp_chunk, batch_tokens=batch_tokens)
            rotary_dim = model.rotary_pos_emb.rotary_dim
            _free(model)
            for res in results:
                scored_len = window if window is not None and window < res["length"] else res["length"]
                effective = rope.base
                if rope.dynamic_ntk:
                    from megarope.rope import dynamic_ntk_base

                    effective = dynamic_ntk_base(rope.base, scored_len, rope.train_len, rotary_dim, rope.ntk_alpha)
                rec = {"run": r.name, "checkpoint": r.checkpoint, "variant": r.variant.name, "base": rope.base,
                       "effective_base": effective, "dynamic_ntk": rope.dynamic_ntk,
                       "log_scale_ref": rope.log_scale_ref, "tune_len": rope.train_len,
                       "pretrain_len": pretraining_of(r.meta)[0], "predicted_bound": bound, "regime": regime,
                       "window": window, "stride": (stride or window // 2) if window else None,
                       "tokenizer": r.tokenizer.spec, **res}
                records.append(rec)
                if verbose and main:
                    print(f"{r.name} @ {res['length']}: ppl {res['ppl']:.4g}  loss {res['loss']:.4f}  acc "
                          f"{res['accuracy']:.4f}  ({res['n_docs']} docs, {res['n_skipped']} skipped, "
                          f"{res['seconds']:.1f} s)", flush=True)
    finally:
        if own_init:
            parallel.destroy()
    if out_dir and main:
        write_results(records, out_dir)
    if verbose and main:
        print()
        print(format_table(records))
        if out_dir:
            print(f"\nresults in {out_dir}/results.json, results.csv, ppl_vs_length.png, loss_by_position.png")
    return records


# ----------------------------------------------------------------------------------------------- outputs
CSV_FIELDS = ["run", "checkpoint", "variant", "base", "effective_base", "length", "loss", "ppl", "accuracy", "n_docs",
              "n_skipped", "n_tokens", "window", "stride", "predicted_bound", "regime", "tokens_per_s", "buckets"]


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def write_results(records: list[dict], out_dir: str) -> None:
    from megarope import plots

    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "results.json"), _json_safe(records))
    with atomic_files([os.path.join(out_dir, "results.csv")]) as (tmp,), open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for rec in records:
            row = dict(rec)
            row["buckets"] = ";".join(f"{b['start']}-{b['end']}:{b['loss']:.5f}" for b in rec["buckets"])
            writer.writerow(row)
    plots.ppl_vs_length(records, os.path.join(out_dir, "ppl_vs_length.png"))
    plots.loss_by_position(records, os.path.join(out_dir, "loss_by_position.png"))


def _fmt_ppl(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4g}" if x < 1e5 else f"{x:.3g}"


def format_table(records: list[dict]) -> str:
    """Rows = runs, columns = lengths, cells = perplexity."""
    runs = list(dict.fromkeys(r["run"] for r in records))
    lengths = sorted({r["length"] for r in records})
    cell = {(r["run"], r["length"]): r["ppl"] for r in records}
    width = max([len("run")] + [len(r) for r in runs])
    head = f"{'run':<{width}}" + "".join(f"  {format_tokens(n):>9}" for n in lengths)
    lines = ["perplexity", head, "-" * len(head)]
    for name in runs:
        lines.append(f"{name:<{width}}" + "".join(f"  {_fmt_ppl(cell.get((name, n))):>9}" for n in lengths))
    return "\n".join(lines)
