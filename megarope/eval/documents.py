"""The documents an evaluation reads: texts from paths or strings, and their token ids.

Every document is tokenized with the model's tokenizer, the tokenizer's BOS first when it has one
(as LLaMA was trained; ``bos=False`` turns that off), and truncated at the longest length asked for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from megarope import data
from megarope.errors import UsageError


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
