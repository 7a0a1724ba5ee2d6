"""Tiny HF models and tokenizers of each family, made in the tests (nothing is downloaded).

    tokenizer_dir(path, "llama3")          a byte-level BPE trained with the `tokenizers` library, saved
                                           as an HF tokenizer directory in that family's manner
    random_hf(path, "qwen2", vocab_size=320, ...)   a random tiny model saved with save_pretrained
"""

from __future__ import annotations

import json
import os

import torch

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, num_hidden_layers=2,
            max_position_embeddings=128, tie_word_embeddings=False)
TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, hello megarope", "def f(x):\n    return x * 2",
         "rope bases and scaling laws", "pack my box with five dozen liquor jugs"]

# Each style: its special tokens, what its tokenizer_config.json says, and whether tokenizer.json prepends BOS.
STYLES = {
    # Llama-3: tokenizer.json's post-processor prepends <|begin_of_text|>; the config names no add_bos_token
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, "<|begin_of_text|>"),
    # Llama-2 and Mistral: <s> added because the config says add_bos_token
    "llama2": (["<unk>", "<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}, None),
    # Qwen2: no BOS at all
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], {"bos_token": None, "eos_token": "<|endoftext|>"}, None),
    # a chat model's config naming a chat token as BOS that is never added
    "chat": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
             {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}, None),
}
FAMILY_STYLE = {"llama": "llama3", "mistral": "llama2", "qwen2": "qwen2"}


def tokenizer_dir(path, style: str = "llama3", vocab_size: int = 300):
    """A byte-level BPE of ``vocab_size`` tokens (specials first) as an HF tokenizer directory at ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, config, prepend = STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer)
    if prepend:
        tok.post_processor = processors.TemplateProcessing(single=f"{prepend} $A", pair=f"{prepend} $A {prepend} $B",
                                                           special_tokens=[(prepend, tok.token_to_id(prepend))])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f)
    return path


def hf_config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    extra = {"mistral": {"sliding_window": None}}.get(family, {})
    return cls(**{**TINY, "vocab_size": 300, **extra, **overrides})


def random_hf(path, family: str = "llama", seed: int = 0, tokenizer: str | None = "auto", **overrides):
    """A random tiny model of ``family`` saved to ``path`` (fp32 safetensors), weights large enough for O(1)
    logits, with a tokenizer of the family's style unless ``tokenizer`` is None. Returns the eval-mode model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = hf_config(family, **overrides)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer_dir(path, FAMILY_STYLE[family] if tokenizer == "auto" else tokenizer,
                      vocab_size=min(300, config.vocab_size))
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits
