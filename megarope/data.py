"""Data: tokenizers, raw text in, megatron indexed datasets out, and the GPTDataset that training reads.

The path a corpus takes:

    text / JSONL files --iter_documents--> strings --tokenizer--> ids + EOD --preprocess--> prefix.bin/.idx
    prefix.bin/.idx (one or a weighted blend) --build_gpt_dataset--> megatron GPTDataset of seq_len samples

Everything from the .bin/.idx format on is megatron-core's own code (IndexedDatasetBuilder, GPTDataset,
BlendedMegatronDatasetBuilder); this module only feeds it. Three kinds of tokenizer: "bytes" (UTF-8
bytes, nothing to download, for toy runs on a laptop), a sentencepiece .model file (LLaMA-2's kind),
and an HF tokenizer directory (tokenizer.json / tokenizer_config.json: Llama-3, Mistral, Qwen2, ...).
`stdlib_corpus` gives every machine the same small corpus: the Python standard library's own source.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import socket
import sysconfig
import tempfile
import warnings
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from html.parser import HTMLParser

import sentencepiece
import torch.distributed
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
from megatron.core.datasets.utils import Split
from megatron.core.tokenizers import MegatronTokenizerBase
from tqdm import tqdm

from megarope import parallel
from megarope.errors import UsageError
from megarope.files import atomic_dir, atomic_files, sha256_file, write_json_atomic

TEXT_SUFFIXES = (".txt",)
# What an HF tokenizer directory holds (a model directory holds these next to its weights).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
HF_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")
CHECKPOINT_TOKENIZER_DIR = "tokenizer"  # where an HF tokenizer travels inside a checkpoint
CHECKPOINT_TOKENIZER_FILE = "tokenizer.model"  # and a sentencepiece one
JSONL_SUFFIXES = (".jsonl", ".json")  # .json here means JSON lines, as megatron's own preprocessing reads it


# ----------------------------------------------------------------------------------------------- tokenizers
class Tokenizer(MegatronTokenizerBase):
    """What the rest of megarope needs from a tokenizer, on top of megatron's base class.

    GPTDataset reads `eod` (and `vocab_size`, to pick the token dtype); its cache key serialises the
    tokenizer through `unique_identifiers`. `spec` is what `load_tokenizer` takes back, so a checkpoint
    that records it can rebuild the same tokenizer.
    """

    name: str
    eod: int
    bos: int | None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text to token ids, without bos or eod."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Token ids to text; special ids decode to nothing."""

    @property
    def spec(self) -> str:
        return self.path if self.path is not None else self.name

    @property
    def files(self) -> list[str]:
        """The files this tokenizer is read from (none for bytes)."""
        return [self.path] if self.path is not None else []

    @property
    def defining_files(self) -> list[str]:
        """The files that decide how text is tokenized: what ``digest`` hashes."""
        return self.files

    @property
    def digest(self) -> str:
        """Names the tokenizer by content: equal digests, equal tokenization (wherever the files lie).
        Checkpoints record it ("tokenizer_digest"), so a tokenizer that is not theirs is refused."""
        h = hashlib.sha256(self.name.encode())
        for path in self.defining_files:
            h.update(os.path.basename(path).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        return h.hexdigest()

    # megatron's abstract interface, in its own names
    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.decode(ids)

    def apply_chat_template(self, *args, **kwargs):
        raise TypeError("base-model tokenizers carry no chat template")

    @property
    def unique_identifiers(self) -> OrderedDict:
        # part of the hash that names megatron's index caches: same data + other EOD must not share a cache
        return OrderedDict(cls=type(self).__name__, name=self.name, path=self.path,
                           vocab_size=self.vocab_size, eod=self.eod)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are the tokens 0..255, and 256 ends a document. No file, no training."""

    name = "bytes"

    def __init__(self):
        super().__init__(path=None, config={})
        self.eod, self.bos = 256, None

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def vocab(self) -> list[str]:
        return [f"<0x{i:02X}>" for i in range(256)] + ["<eod>"]  # sentencepiece's names for byte pieces

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # a model's sample may end inside a multi-byte character: replace, don't raise
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file, e.g. LLaMA's tokenizer.model (unk 0, bos 1, eos 2; eos ends a document)."""

    name = "sentencepiece"

    def __init__(self, path: str):
        super().__init__(path=os.path.abspath(path), config={})
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise UsageError(f"cannot read sentencepiece model {path}: {e}") from None
        if self._sp.eos_id() < 0:
            raise UsageError(f"sentencepiece model {path} has no eos piece to end documents with")
        self.eod = self._sp.eos_id()
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)  # no bos/eos: preprocess decides what goes between documents

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """An HF tokenizer directory, read through megatron-core's HuggingFaceTokenizer (transformers' AutoTokenizer).

    BOS follows the tokenizer's own config: an explicit ``add_bos_token`` in tokenizer_config.json
    decides (some configs name a chat token as BOS but never add it); without one, BOS is what the
    tokenizer itself puts first when asked for special tokens (Llama-3's tokenizer.json prepends
    <|begin_of_text|>; Qwen2's prepends nothing). EOS ends a document.
    """

    name = "huggingface"

    def __init__(self, path: str):
        super().__init__(path=os.path.abspath(path), config={})
        if not any(os.path.isfile(os.path.join(self.path, f)) for f in HF_TOKENIZER_MARKERS):
            raise UsageError(f"{path}: not an HF tokenizer directory (neither tokenizer.json nor tokenizer_config.json)")
        # Imported here: transformers takes seconds to import, and only HF tokenizers need it.
        from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import HuggingFaceTokenizer

        try:
            self._hf = HuggingFaceTokenizer(self.path, include_special_tokens=False)
        except (ValueError, OSError) as e:
            raise UsageError(f"cannot read HF tokenizer {path}: {str(e).splitlines()[0]}") from None
        auto = self._hf.tokenizer
        if auto.eos_token_id is None:
            raise UsageError(f"HF tokenizer {path} has no eos token to end documents with")
        self.eod = auto.eos_token_id
        self.bos = self._bos(auto)

    def _bos(self, auto) -> int | None:
        config_path = os.path.join(self.path, "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_path):
            with open(config_path) as f:
                config = json.load(f)
        if "add_bos_token" in config:
            return auto.bos_token_id if config["add_bos_token"] else None
        with_specials = auto.encode("a", add_special_tokens=True)
        without = auto.encode("a", add_special_tokens=False)
        starts = [i for i in range(len(with_specials) - len(without) + 1)
                  if with_specials[i:i + len(without)] == without]
        prefix = with_specials[:starts[0]] if starts else []
        return prefix[0] if len(prefix) == 1 else None

    @property
    def files(self) -> list[str]:
        return [os.path.join(self.path, f) for f in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(self.path, f))]

    @property
    def defining_files(self) -> list[str]:
        # a chat template changes no tokenization (and is out of megarope's scope): editing it keeps the digest
        return [f for f in self.files if os.path.basename(f) != "chat_template.jinja"]

    @property
    def vocab_size(self) -> int:
        return self._hf.vocab_size  # len(): added tokens included, as the model's embedding must hold them

    @property
    def vocab(self) -> list[str]:
        return self._hf.tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))

    def encode(self, text: str) -> list[int]:
        # The wrapped AutoTokenizer's own call: the ids megatron's text_to_ids gives without special tokens
        # (checked in the tests), without its detour through token strings (1.7x slower).
        return self._hf.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self._hf.ids_to_text([int(i) for i in ids])  # special tokens dropped (include_special_tokens=False)


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """The tokenizer that `spec` names: "bytes" (byte-level), an HF tokenizer directory (or its
    tokenizer.json), or else the path of a sentencepiece .model."""
    spec = os.fspath(spec)
    if spec == "bytes":
        return ByteTokenizer()
    if os.path.isdir(spec):
        return HFTokenizer(spec)
    if os.path.basename(spec) in HF_TOKENIZER_MARKERS and os.path.isfile(spec):
        return HFTokenizer(os.path.dirname(spec) or ".")
    if not os.path.isfile(spec):
        raise UsageError(f"tokenizer not found: {spec!r} (give 'bytes', a sentencepiece .model file or an HF "
                         f"tokenizer directory)")
    return SentencePieceTokenizer(spec)


def copy_tokenizer(tokenizer: Tokenizer | str | os.PathLike, dest_dir: str) -> str | None:
    """Copy a tokenizer's files into dest_dir, as a checkpoint carries them; returns the name to record
    ("tokenizer.model", or "tokenizer" for an HF tokenizer's directory), or None for bytes (no files)."""
    tokenizer = _as_tokenizer(tokenizer)
    if isinstance(tokenizer, HFTokenizer):
        target = os.path.join(dest_dir, CHECKPOINT_TOKENIZER_DIR)
        os.makedirs(target, exist_ok=True)
        for path in tokenizer.files:
            shutil.copyfile(path, os.path.join(target, os.path.basename(path)))
        return CHECKPOINT_TOKENIZER_DIR
    if tokenizer.path is not None:
        shutil.copyfile(tokenizer.path, os.path.join(dest_dir, CHECKPOINT_TOKENIZER_FILE))
        return CHECKPOINT_TOKENIZER_FILE
    return None


def check_tokenizer(tokenizer: Tokenizer, model_vocab: int, made_with: dict | None = None,
                    carried: Tokenizer | str | os.PathLike | None = None, model: str = "the model") -> None:
    """Refuse, in one line, a tokenizer that cannot belong to ``model`` (a vocabulary of ``model_vocab``):
    more tokens than it has; byte tokens for a model not built on them; or another tokenizer than the one
    the model was made with. ``made_with`` is a checkpoint's metadata: its "tokenizer_vocab_size" and
    "tokenizer_digest" (the content digest convert and train record) must match. ``carried`` is the
    tokenizer the model carries (an HF directory's own, or a checkpoint's from before digests): its size
    and digest stand in for those not recorded. The one check of train, eval, passkey and convert."""
    n = tokenizer.vocab_size
    if n > model_vocab:
        raise UsageError(f"tokenizer {tokenizer.spec} has {n:,} tokens, but {model} has a vocabulary of "
                         f"{model_vocab:,}: not this model's tokenizer")
    if isinstance(tokenizer, ByteTokenizer) and model_vocab != n:
        raise UsageError(f"byte tokens ({n} ids) cannot belong to {model}, whose vocabulary has {model_vocab:,} tokens")
    made_with = made_with or {}
    vocab, digest = made_with.get("tokenizer_vocab_size"), made_with.get("tokenizer_digest")
    if digest is None and carried is not None:
        carried = _as_tokenizer(carried)
        vocab, digest = vocab or carried.vocab_size, carried.digest
    if vocab is not None and n != vocab:
        raise UsageError(f"tokenizer {tokenizer.spec} has {n:,} tokens, but {model} was made with a tokenizer of "
                         f"{vocab:,}: not this model's tokenizer")
    if digest is not None and tokenizer.digest != digest:
        raise UsageError(f"tokenizer {tokenizer.spec} ({n:,} tokens) is not the {f'{vocab:,}-token ' if vocab else ''}"
                         f"tokenizer {model} was made with (their contents differ): not this model's tokenizer")


def _as_tokenizer(tokenizer: Tokenizer | str | os.PathLike) -> Tokenizer:
    return tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)


def train_sentencepiece(input_files: Sequence[str | os.PathLike], vocab_size: int, model_prefix: str,
                        max_sentences: int = 300_000) -> str:
    """Train a LLaMA-like BPE model on the documents in `input_files`; writes and returns model_prefix.model.

    LLaMA's settings: byte fallback (no text is ever <unk>), digits split, whitespace kept as it is (code
    and long documents keep their layout), unk 0 / bos 1 / eos 2 / no pad. Sentencepiece learns from lines,
    so documents are fed line by line, and at most `max_sentences` lines, sampled, keep training quick.
    """
    if vocab_size < 260:
        raise UsageError(f"tokenizer vocab size must be at least 260 (256 bytes + specials), got {vocab_size}")
    files = _input_files(input_files)
    failure = []  # sentencepiece turns our iterator's exceptions into RuntimeError text: keep the original

    def lines():
        try:
            for doc in iter_documents(files):
                yield from (line for line in doc.splitlines() if line.strip())
        except UsageError as e:
            failure.append(e)
            raise

    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=0.99995,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars. 300 vs 344. ..."
        if failure:
            raise failure[0] from None
        raise UsageError(f"sentencepiece training failed: {str(e).split('] ')[-1]}") from None
    path = os.fspath(model_prefix) + ".model"
    with atomic_files([path]) as (tmp,), open(tmp, "wb") as f:
        f.write(model.getvalue())
    return path


# ----------------------------------------------------------------------------------------------- raw text
def _input_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The files behind `paths`: files as given, directories walked for text/JSONL files in sorted order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for path in map(os.fspath, paths):
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                           if name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES))
            if not found:
                raise UsageError(f"no .txt, .jsonl or .json files under {path}")
            files += found
        else:
            raise UsageError(f"input not found: {path}")
    if not files:
        raise UsageError("no input files given")
    return files


def iter_documents(paths: Sequence[str | os.PathLike]) -> Iterator[str]:
    """Yield documents: a JSONL line's "text", or a whole plain-text file (any suffix but .jsonl/.json)."""
    for path in _input_files(paths):
        try:
            with open(path, encoding="utf-8") as f:
                if not path.endswith(JSONL_SUFFIXES):
                    yield f.read()
                    continue
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UsageError(f"{path}:{lineno}: not JSON ({e.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise UsageError(f'{path}:{lineno}: no "text" string in this line')
                    yield record["text"]
        except UnicodeDecodeError:
            raise UsageError(f"{path}: not UTF-8 text") from None


_worker_tokenizer: Tokenizer | None = None  # one per worker process, loaded once from its spec


def _worker_init(spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(spec)


def _worker_encode(text: str) -> list[int]:
    return _worker_tokenizer.encode(text)


def preprocess(inputs: Sequence[str | os.PathLike], tokenizer: Tokenizer | str | None, output_prefix: str,
               train_tokenizer_vocab: int | None = None, workers: int = 1) -> dict:
    """Tokenize every document, start it with BOS and end it with EOD, and write megatron's output_prefix.bin/.idx.

    With `train_tokenizer_vocab`, first train output_prefix.tokenizer.model on the same inputs and use it
    (a finished tokenizer stays even if tokenizing fails later). Empty documents are skipped, as megatron's
    tools/preprocess_data.py does. BOS only where the tokenizer has one (LLaMA's <s>: LLaMA was
    pretrained with it at every document's start, and the evaluator reads documents the same way).
    Returns a summary dict (documents, tokens, prefix, bin, idx, tokenizer spec, vocab_size).
    """
    output_prefix = os.fspath(output_prefix)
    files = _input_files(inputs)  # fail on a missing input before anything is written
    if train_tokenizer_vocab is not None and tokenizer is not None:
        raise UsageError("give a tokenizer or train one, not both")
    if train_tokenizer_vocab is None and tokenizer is None:
        raise UsageError("no tokenizer: give 'bytes', a sentencepiece .model, an HF tokenizer directory, or train one")
    if workers < 1:
        raise UsageError(f"workers must be at least 1, got {workers}")
    if tokenizer is not None:
        tokenizer = _as_tokenizer(tokenizer)
    os.makedirs(os.path.dirname(output_prefix) or ".", exist_ok=True)
    if train_tokenizer_vocab is not None:
        tokenizer = load_tokenizer(train_sentencepiece(files, train_tokenizer_vocab, output_prefix + ".tokenizer"))

    documents = tokens = 0
    outputs = [output_prefix + ".bin", output_prefix + ".idx"]
    pool = multiprocessing.Pool(workers, _worker_init, (tokenizer.spec,)) if workers > 1 else None
    with pool or contextlib.nullcontext(), atomic_files(outputs) as (bin_tmp, idx_tmp):
        # uint16 tokens when the vocabulary allows: half the disk and page cache of int32
        builder = IndexedDatasetBuilder(bin_tmp, dtype=DType.optimal_dtype(tokenizer.vocab_size))
        with contextlib.closing(builder.data_file):  # finalize closes it too; this covers the failures
            texts = iter_documents(files)
            encoded = pool.imap(_worker_encode, texts, chunksize=16) if pool else map(tokenizer.encode, texts)
            # disable=None: a bar on a terminal, silence in logs and pipes
            for ids in tqdm(encoded, desc=f"tokenizing -> {output_prefix}", unit=" docs", disable=None):
                if not ids:
                    continue
                ids = ([tokenizer.bos] if tokenizer.bos is not None else []) + ids + [tokenizer.eod]
                builder.add_document(ids, [len(ids)])
                documents += 1
                tokens += len(ids)
            if documents == 0:
                raise UsageError(f"no text in {', '.join(files)}")
            builder.finalize(idx_tmp)
    return {"documents": documents, "tokens": tokens, "prefix": output_prefix,
            "bin": output_prefix + ".bin", "idx": output_prefix + ".idx",
            "tokenizer": tokenizer.spec, "vocab_size": tokenizer.vocab_size}


# ----------------------------------------------------------------------------------------------- reading
def build_gpt_dataset(paths_and_weights, seq_len: int, num_samples: int | None, seed: int,
                      tokenizer: Tokenizer | str, cache_dir: str | None = None, split_name: str = "train",
                      reset_position_ids: bool = False, reset_attention_mask: bool = False,
                      eod_mask_loss: bool = False):
    """Megatron's GPTDataset over one prefix, or its BlendedDataset over several, with `num_samples` samples.

    `paths_and_weights`: a prefix, or a list whose items are a prefix (weight 1) or a (prefix, weight) pair.
    Each sample is a dict of tokens / labels (tokens shifted by one) / loss_mask / position_ids, each
    seq_len long. Megatron's index caches go to `cache_dir`, by default `.cache` beside the first prefix.
    num_samples=None means one pass over the data (a single prefix only). The document options are
    megatron's (GPTDatasetConfig): positions that restart after each EOD, and no loss where the input is
    EOD; `reset_attention_mask` builds no mask (megarope's attention reads the documents from the tokens:
    megarope.packing), megatron only records it.

    Under torch.distributed (collective): rank 0 builds the indices and the other ranks read them from
    `cache_dir`, which every rank must therefore see (see _build_on_rank_0_first).
    """
    tokenizer = _as_tokenizer(tokenizer)
    if isinstance(paths_and_weights, (str, os.PathLike)):
        paths_and_weights = [paths_and_weights]
    pairs = [(item, 1.0) if isinstance(item, (str, os.PathLike)) else item for item in paths_and_weights]
    prefixes = [os.fspath(p) for p, _ in pairs]
    weights = [float(w) for _, w in pairs]
    if not prefixes:
        raise UsageError("no dataset prefix given")
    missing = [p for p in prefixes if not IndexedDataset.exists(p)]
    if missing:
        raise UsageError(f"no indexed dataset (.bin + .idx) at prefix {', '.join(missing)}")
    if any(w <= 0 for w in weights):
        raise UsageError(f"blend weights must be positive, got {weights}")
    if seq_len < 1 or (num_samples is not None and num_samples < 1):
        raise UsageError(f"seq_len and num_samples must be positive, got {seq_len} and {num_samples}")
    if num_samples is None and len(prefixes) > 1:
        raise UsageError("a weighted blend needs num_samples")
    try:
        split = Split[split_name]
    except KeyError:
        raise UsageError(f"split must be one of {[s.name for s in Split]}, got {split_name!r}") from None

    if cache_dir is None:
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), ".cache")
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError:  # read-only data directory
            cache_dir = os.path.join(tempfile.gettempdir(), "megarope-cache")
    # blend_per_split rather than blend + split string: the whole of each prefix serves the one split asked for
    blend = (prefixes, weights if len(prefixes) > 1 else None)
    sizes = [num_samples if s == split else None for s in Split]
    with warnings.catch_warnings():  # megatron's logging warns it "could not determine rank" when there is none
        warnings.filterwarnings("ignore", message="Could not determine rank")
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_len, tokenizer=tokenizer, path_to_cache=cache_dir,
            blend_per_split=[blend if s == split else None for s in Split],
            reset_position_ids=reset_position_ids, reset_attention_mask=reset_attention_mask,
            eod_mask_loss=eod_mask_loss,
            create_attention_mask=False)  # our core attention is causal by construction: no mask tensors
        # is_built_on_rank=True everywhere: every rank holds the dataset
        build = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build
        distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        datasets = _build_on_rank_0_first(build, cache_dir) if distributed else build()
    return datasets[split.value]


def _build_on_rank_0_first(build, cache_dir: str):
    """megatron's dataset build under torch.distributed, without its long wait in NCCL.

    megatron builds the indices on rank 0 and writes them to the cache while every other rank waits in a
    barrier of the default group, then those ranks read the cache (0.19.2: BlendedMegatronDatasetBuilder,
    GPTDataset). On GPUs that barrier is NCCL's, whose watchdog ends the job when rank 0 builds for longer than
    its timeout (10 minutes), and where a failure on rank 0 leaves the others waiting until then. So rank 0
    first builds alone (megatron sees no process group: its world-of-one path, no collective call) while the
    others wait on the host-side group; then every rank runs megatron's build, which rank 0's cache makes quick.
    A rank that does not find rank 0's files in ``cache_dir`` sees another directory under that name (a
    node-local one, on another node): refused in one line on every rank.
    """
    with parallel.fail_together():
        if parallel.is_main():
            try:
                with parallel.as_world_of_one():
                    build()
            except OSError as e:
                raise UsageError(f"cannot write megatron's dataset index cache to {cache_dir}: "
                                 f"{e.strerror or e} (set data.cache_dir to a writable directory)") from e
    with parallel.fail_together():
        try:
            return build()
        except FileNotFoundError as e:
            raise UsageError(f"rank {torch.distributed.get_rank()} (on {socket.gethostname()}) does not see the "
                             f"dataset indices rank 0 wrote to {cache_dir}: the index cache must be on a file "
                             f"system every node sees; set data.cache_dir to one") from e


def fingerprint(paths_and_weights: Sequence[tuple[str, float]]) -> list[dict]:
    """What identifies a run's training data, per (prefix, weight): the SHA-256 of prefix.idx and the
    size of prefix.bin. A training checkpoint records it and a resume compares (preflight.check_data).

    Why these: the .idx holds every document's length and offset (about 20 bytes a document), so
    documents added, removed, reordered or tokenized differently change it, and it is small enough to
    hash at every start; the .bin's size catches tokens appended or cut. Hashing the .bin as well would
    read the whole corpus (terabytes) at every start and save. Size and modification time alone would
    be cheaper but fragile both ways: a copy or a restore from backup changes the mtime of unchanged
    data (a refusal for nothing), and a rewrite within the same second keeps it. What this misses:
    tokens changed in place with every length kept. The prefix's path is recorded but not compared:
    data moved elsewhere is the same data.
    """
    return [{"prefix": os.path.abspath(prefix), "weight": float(weight), "idx_sha256": sha256_file(prefix + ".idx"),
             "bin_bytes": os.path.getsize(prefix + ".bin")} for prefix, weight in paths_and_weights]


# ----------------------------------------------------------------------------------------------- corpora
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
STDLIB_DOC_SUFFIXES = (".txt", ".rst", ".html")


def _stdlib_files(root: str, suffixes: tuple[str, ...]) -> list[str]:
    """The files under the stdlib's ``root`` with these suffixes, relative, in sorted order (site-packages and
    the test packages left out)."""
    files = []
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP]
        files += [os.path.relpath(os.path.join(dirpath, n), root) for n in names if n.endswith(suffixes)]
    return sorted(files)


def _read_text(path: str) -> str | None:
    """A file's UTF-8 text; None for an empty file or one in another encoding."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8") or None
    except UnicodeDecodeError:
        return None


def stdlib_sources(root: str | os.PathLike | None = None) -> dict[str, str]:
    """The standard library's .py files by relative path (in sorted order), as text. Empty files (no
    documents) and modules that declare another coding are left out. ``root`` replaces the stdlib (tests)."""
    root = os.fspath(root or sysconfig.get_paths()["stdlib"])
    texts = {}
    for rel in _stdlib_files(root, (".py",)):
        text = _read_text(os.path.join(root, rel))
        if text is not None:
            texts[rel] = text
    return texts


class _HTMLText(HTMLParser):
    """The text of an HTML page, without its markup, scripts and styles."""

    def __init__(self):
        super().__init__()
        self.parts, self._hidden = [], 0

    def handle_starttag(self, tag, attrs):
        self._hidden += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._hidden -= tag in ("script", "style") and self._hidden > 0

    def handle_data(self, data):
        if not self._hidden:
            self.parts.append(data)


def stdlib_documentation(root: str | os.PathLike | None = None) -> dict[str, str]:
    """The documentation the standard library ships in its own tree, as plain text, by name.

    pydoc's topics (pydoc_data/topics.py: the sections of the language reference that help() shows,
    one document per topic, read as data, not imported), the text of IDLE's help page
    (idlelib/help.html) and the text files (.txt, .rst: IDLE's NEWS, README and HISTORY, LICENSE.txt,
    email's architecture notes, lib2to3's grammar). ``root`` replaces the stdlib (tests).
    """
    import ast

    root = os.fspath(root or sysconfig.get_paths()["stdlib"])
    docs = {}
    topics = os.path.join(root, "pydoc_data", "topics.py")
    if os.path.isfile(topics):
        with open(topics, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
                for name, text in ast.literal_eval(node.value).items():
                    docs[f"pydoc_data/topics.py:{name}"] = text
    for rel in _stdlib_files(root, STDLIB_DOC_SUFFIXES):
        text = _read_text(os.path.join(root, rel))
        if text is not None and rel.endswith(".html"):
            parser = _HTMLText()
            parser.feed(text)
            lines = (line.strip() for line in "".join(parser.parts).splitlines())  # markup leaves blank runs
            text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if text and text.strip():
            docs[rel.replace(os.sep, "/")] = text
    return docs


def stdlib_long_corpus(out_dir: str | os.PathLike, tokenizer: Tokenizer | str,
                       documents: Sequence[tuple[int, int]], source_dir: str | os.PathLike | None = None
                       ) -> tuple[str, dict[tuple[int, int], str]]:
    """The standard library's source and documentation, tokenized with ``tokenizer``, as a training set,
    and held-out evaluation documents as long as an evaluation needs. Returns the training prefix and,
    for each (length, count) of ``documents``, the .jsonl of ``count`` documents of at least ``length``
    tokens.

    An evaluation document is whole held-out source files joined in a fixed order, each headed by its
    path ("# file: asyncio/events.py"): a long stretch of real, related text, as a book is for the
    paper's Books3 evaluation (where files meet, nothing ties one to the next, which only makes the
    long context less useful, never misleading). Source files are held out in an order that spreads
    them over the library (by the SHA-256 of their paths) until every request can be met; the rest of
    the source and all of the documentation (stdlib_documentation) are the training set. Needing more
    than half of the library's source is refused in one line. Everything is written once into
    out_dir/stdlib-<tokenizer>-<its digest>-<the request's hash>/ and reused after that.
    """
    import platform

    tokenizer = _as_tokenizer(tokenizer)
    requests = sorted({(int(length), int(count)) for length, count in documents})
    root = os.fspath(source_dir or sysconfig.get_paths()["stdlib"])
    key = hashlib.sha256(json.dumps({"documents": requests, "root": os.path.abspath(root),
                                     "python": platform.python_version()}).encode()).hexdigest()[:8]
    final = os.path.join(os.fspath(out_dir), f"stdlib-{tokenizer.name}-{tokenizer.digest[:8]}-{key}")
    paths = {r: os.path.join(final, f"eval-{r[0]}x{r[1]}.jsonl") for r in requests}
    prefix = os.path.join(final, "train")
    if os.path.isfile(os.path.join(final, "corpus.json")):  # written last: the directory is complete
        return prefix, paths

    sources = {rel.replace(os.sep, "/"): text for rel, text in stdlib_sources(root).items()}
    sources.pop("pydoc_data/topics.py", None)  # documentation, read as such by stdlib_documentation
    held, built = _hold_out(sources, tokenizer, requests)
    os.makedirs(os.fspath(out_dir), exist_ok=True)
    with atomic_dir(final) as tmp:
        for request, docs in built.items():
            with open(os.path.join(tmp, os.path.basename(paths[request])), "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"files": files, "text": text}) + "\n" for files, text in docs)
        train_jsonl = os.path.join(tmp, "train.jsonl")
        with open(train_jsonl, "w", encoding="utf-8") as f:
            for name, text in [*((r, t) for r, t in sources.items() if r not in held),
                               *stdlib_documentation(root).items()]:
                f.write(json.dumps({"path": name, "text": text}) + "\n")
        summary = preprocess([train_jsonl], tokenizer, os.path.join(tmp, "train"))
        write_json_atomic(os.path.join(tmp, "corpus.json"),
                          {"root": os.path.abspath(root), "tokenizer": tokenizer.spec, "held_out": sorted(held),
                           "train_documents": summary["documents"], "train_tokens": summary["tokens"],
                           "eval": {f"{length}x{count}": [files for files, _ in built[(length, count)]]
                                    for length, count in requests}})
    return prefix, paths


def _hold_out(sources: dict[str, str], tokenizer: Tokenizer, requests: list[tuple[int, int]]):
    """(the held-out files, for each request its documents as (files, text)): source files taken in the
    order of their paths' SHA-256 until every request can be packed, each document at least its length."""
    order = sorted(sources, key=lambda rel: hashlib.sha256(rel.encode()).hexdigest())
    limit = sum(len(t) for t in sources.values()) / 2
    pieces, chars = [], 0  # (file, text, tokens) in hold-out order

    def pack(length: int, count: int):
        docs, current, tokens = [], [], 0
        for piece in pieces:
            current.append(piece)
            tokens += piece[2]
            if tokens >= length + 8 + length // 100:  # a margin for the tokens where two files meet
                docs.append(current)
                current, tokens = [], 0
                if len(docs) == count:
                    return docs
        return None

    for rel in order:
        if all(pack(*r) for r in requests):
            break
        text = f"# file: {rel}\n{sources[rel].rstrip()}\n"
        pieces.append((rel, text, len(tokenizer.encode(text))))
        chars += len(text)
        if chars > limit:
            break
    built = {}
    for length, count in requests:
        docs = pack(length, count)
        if docs is None:
            held_tokens = sum(p[2] for p in pieces)
            raise UsageError(f"the standard library is too short for {count} evaluation document(s) of {length:,} "
                             f"tokens with tokenizer {tokenizer.spec}: they would take more than half of its source "
                             f"(half is about {held_tokens:,} tokens)")
        built[(length, count)] = []
        for doc in docs:
            text = "\n".join(piece[1] for piece in doc)
            got = len(tokenizer.encode(text))
            if got < length:  # the margin for where files meet did not hold: a bug, not bad input
                raise RuntimeError(f"an evaluation document came out at {got:,} tokens, under {length:,}")
            built[(length, count)].append(([piece[0] for piece in doc], text))
    return {piece[0] for piece in pieces}, built


def stdlib_corpus(out_dir: str | os.PathLike, n_eval_files: int = 20, min_eval_bytes: int = 8192,
                  source_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """The Python standard library's source as a corpus: out_dir/train.jsonl and out_dir/eval.jsonl.

    Every machine has it, so toy runs and demos need no download. Files are taken in sorted order
    (site-packages and test packages left out); eval holds `n_eval_files` files of at least
    `min_eval_bytes` (every k-th such file, so they spread over the library), train holds the rest.
    Nothing is rewritten if both files exist. `source_dir` replaces the stdlib (for tests).
    """
    if n_eval_files < 1:
        raise UsageError(f"n_eval_files must be at least 1, got {n_eval_files}")
    out_dir = os.fspath(out_dir)
    train_path, eval_path = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "eval.jsonl")
    if os.path.isfile(train_path) and os.path.isfile(eval_path):
        return train_path, eval_path

    root = os.fspath(source_dir or sysconfig.get_paths()["stdlib"])
    texts = stdlib_sources(root)

    big = [rel for rel in texts if len(texts[rel].encode("utf-8")) >= min_eval_bytes]
    if len(big) < n_eval_files or len(texts) <= n_eval_files:
        raise UsageError(f"{root}: only {len(big)} .py files of >= {min_eval_bytes} bytes "
                         f"({len(texts)} in all), {n_eval_files} wanted for evaluation")
    step = len(big) // n_eval_files
    held_out = set(big[step // 2::step][:n_eval_files])

    os.makedirs(out_dir, exist_ok=True)
    with atomic_files([train_path, eval_path]) as (train_tmp, eval_tmp), \
            open(train_tmp, "w", encoding="utf-8") as train_f, open(eval_tmp, "w", encoding="utf-8") as eval_f:
        for rel, text in texts.items():
            line = json.dumps({"path": rel.replace(os.sep, "/"), "text": text}) + "\n"
            (eval_f if rel in held_out else train_f).write(line)
    return train_path, eval_path


def prepare_toy_data(out_dir: str | os.PathLike, tokenizer: Tokenizer | str = "bytes") -> str:
    """The stdlib corpus, tokenized: returns the prefix of out_dir/train.bin/.idx (built once, then reused).

    Any other tokenizer than bytes gets its own prefix, train-<name>-<content digest>, so no two mix.
    """
    tokenizer = _as_tokenizer(tokenizer)
    train_jsonl, _ = stdlib_corpus(out_dir)
    name = "train" if tokenizer.path is None else \
        f"train-{os.path.splitext(os.path.basename(tokenizer.path))[0]}-{tokenizer.digest[:8]}"
    prefix = os.path.join(os.fspath(out_dir), name)
    if not IndexedDataset.exists(prefix):
        preprocess([train_jsonl], tokenizer, prefix)
    return prefix
