"""HF LLaMA <-> megarope conversion: logits equal to transformers' at TP=1, TP=2 and CP=2, both config
forms and the RoPE scaling types, an exact round trip, and one-line errors for bad inputs."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 64
TINY = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            num_hidden_layers=2, max_position_embeddings=128, tie_word_embeddings=False)


def random_llama(path, seed=0, **overrides):
    """A random tiny LlamaForCausalLM saved to ``path``, with weights large enough for O(1) logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides}, dtype="float32", attn_implementation="eager")
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def tokens_for(vocab=256):
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(7))


def convert(hf_dir, out_dir, tp=1):
    from megarope import convert as conv, parallel

    try:
        return conv.hf_to_mcore(str(hf_dir), str(out_dir), tp)
    finally:
        parallel.destroy()


def mcore_logits(ckpt_dir, tokens, tp=1, cp=1):
    """This rank's logits: [b, s/cp (its two CP chunks), padded_vocab/tp]."""
    from megarope import checkpoint, parallel

    parallel.init(tp=tp, cp=cp)
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    local = parallel.slice_for_cp({"tokens": tokens, "position_ids": position_ids})
    model = checkpoint.build_from_checkpoint(str(ckpt_dir))
    model.eval()
    with torch.no_grad():
        return model(local["tokens"], local["position_ids"], None)


def _tp2_and_cp2(ckpt_dirs, tokens):
    return {(d, layout): mcore_logits(d, tokens, **dict([layout])) for d in ckpt_dirs
            for layout in (("tp", 2), ("cp", 2))}


def assemble_cp(pieces):
    """Put each CP rank's two chunks (r and 2*CP-1-r) back in sequence order."""
    from megarope.parallel import cp_chunk_ids

    cp = len(pieces)
    chunks = {}
    for rank, local in enumerate(pieces):
        for slot, cid in enumerate(cp_chunk_ids(cp, rank)):
            chunks[cid] = local.chunk(2, dim=1)[slot]
    return torch.cat([chunks[c] for c in range(2 * cp)], dim=1)


THETAS = [500.0, 1e6]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """For each RoPE base: (HF model, its dir, the converted megarope dir, HF logits)."""
    out = {}
    for i, theta in enumerate(THETAS):
        root = tmp_path_factory.mktemp(f"theta{theta:g}")
        model = random_llama(root / "hf", seed=i, rope_theta=theta)
        meta = convert(root / "hf", root / "mcore")
        assert meta["rope"]["base"] == theta and meta["source"] == "hf"
        out[theta] = model, root / "hf", root / "mcore", hf_logits(model, tokens_for())
    return out


@pytest.fixture
def converted(models):
    return models[1e6]


@pytest.mark.parametrize("theta", THETAS)
def test_logits_tp1(models, theta):
    _, _, mcore, expected = models[theta]
    got = mcore_logits(mcore, tokens_for())
    assert got.shape == (2, SEQ, 256)
    assert (got - expected).abs().max() <= 1e-4
    assert expected.std() > 0.5  # logits large enough for the comparison to mean something


def test_logits_tp2_and_cp2(models):
    dirs = [str(models[t][2]) for t in THETAS]
    r0, r1 = run_distributed(_tp2_and_cp2, 2, dirs, tokens_for())
    for theta, key in zip(THETAS, dirs):
        tp = torch.cat([r0[key, ("tp", 2)], r1[key, ("tp", 2)]], dim=-1)
        cp = assemble_cp([r0[key, ("cp", 2)], r1[key, ("cp", 2)]])
        for got in (tp, cp):
            assert got.shape == (2, SEQ, 256)
            assert (got - models[theta][3]).abs().max() <= 1e-4, theta


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "dynamic", "factor": 2.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}],
                         ids=lambda r: r["rope_type"])
def test_scaled_rope_and_padded_vocab_logits(tmp_path, rope):
    # max_position_embeddings 32 < SEQ so that dynamic NTK is active; vocab 200 is padded to 256
    model = random_llama(tmp_path / "hf", vocab_size=200, max_position_embeddings=32,
                         rope_parameters={"rope_theta": 1000.0, **rope})
    meta = convert(tmp_path / "hf", tmp_path / "mcore")
    assert meta["preset"]["vocab_size"] == 200
    got = mcore_logits(tmp_path / "mcore", tokens_for(200))
    assert (got[..., :200] - hf_logits(model, tokens_for(200))).abs().max() <= 1e-4
    from megarope import parallel

    parallel.destroy()
    state = torch.load(_export_state(tmp_path / "mcore", tmp_path / "state.pt"), weights_only=True)
    assert state["embedding.word_embeddings.weight"][200:].abs().max() == 0
    assert state["output_layer.weight"][200:].abs().max() == 0


def test_tied_embeddings_become_untied(tmp_path):
    model = random_llama(tmp_path / "hf", tie_word_embeddings=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    convert(tmp_path / "hf", tmp_path / "mcore")
    assert (mcore_logits(tmp_path / "mcore", tokens_for()) - hf_logits(model, tokens_for())).abs().max() <= 1e-4


def _export_state(ckpt_dir, path):
    from megarope import checkpoint, parallel

    parallel.init(tp=1)
    model = checkpoint.build_from_checkpoint(str(ckpt_dir))
    torch.save({k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}, path)
    parallel.destroy()
    return path


def test_config_forms(tmp_path):
    from megarope.convert import hf_fields

    base = {**TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    old = hf_fields({**base, "rope_theta": 5e5})[1]
    new = hf_fields({**base, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})[1]
    assert old == new == {"base": 5e5, "train_len": 128}
    assert hf_fields(base)[1]["base"] == 10000.0
    old_linear = hf_fields({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4}})[1]
    assert old_linear == {"base": 5e5, "train_len": 128, "linear_factor": 4.0}
    dynamic = hf_fields({**base, "rope_parameters": {"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2.0,
                                                     "original_max_position_embeddings": 64}})[1]
    assert dynamic == {"base": 1e4, "train_len": 128, "dynamic_ntk": True, "ntk_alpha": 2.0}  # as transformers does
    assert hf_fields({**base, "rope_parameters": {"rope_theta": 1e4, "rope_type": "llama3", "factor": 8.0}})[1][
        "llama3_factor"] == 8.0


def test_old_config_form_through_cli(converted, tmp_path):
    _, hf, _, _ = converted
    old = tmp_path / "hf_old"
    shutil.copytree(hf, old)
    cfg = json.loads((old / "config.json").read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]
    (old / "config.json").write_text(json.dumps({**cfg, "rope_theta": theta}))
    r = run_cli("convert", "--from-hf", old, "--to", tmp_path / "mcore", "--tp", "2")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "mcore" / "megarope.json").read_text())
    assert meta["rope"]["base"] == theta and meta["intended_tp"] == 2 and meta["hf_config"]["rope_theta"] == theta


def test_round_trip(converted, tmp_path):
    from transformers import LlamaForCausalLM

    from megarope import convert as conv, parallel

    _, _, mcore, expected = converted
    try:
        cfg = conv.mcore_to_hf(str(mcore), str(tmp_path / "hf"))
    finally:
        parallel.destroy()
    assert cfg["rope_parameters"]["rope_theta"] == cfg["rope_theta"] == json.loads(
        (mcore / "megarope.json").read_text())["rope"]["base"]
    back = LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert torch.equal(hf_logits(back, tokens_for()), expected)
    meta = convert(tmp_path / "hf", tmp_path / "mcore")
    assert meta["preset"] == json.loads((mcore / "megarope.json").read_text())["preset"]
    a = torch.load(_export_state(mcore, tmp_path / "a.pt"), weights_only=True)
    b = torch.load(_export_state(tmp_path / "mcore", tmp_path / "b.pt"), weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bin_checkpoint_reads_like_safetensors(converted, tmp_path):
    from safetensors.torch import load_file

    from megarope.convert import HFWeights

    _, hf, _, _ = converted
    state = load_file(hf / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(hf / "config.json", tmp_path / "config.json")
    weights = HFWeights(str(tmp_path))
    assert weights.shapes == {k: tuple(v.shape) for k, v in state.items()}
    assert all(torch.equal(weights[k], v) for k, v in state.items())


# ---------------------------------------------------------------------------- bad inputs
def run_cli(*args):
    # parallel.init in this process leaves MASTER_PORT in os.environ: a child must pick its own
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, "-m", "megarope", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env)


def expect_usage_error(hf_dir, dest, *extra, match=""):
    r = run_cli("convert", "--from-hf", hf_dir, "--to", dest, *extra)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("megarope: error: ") and match in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path, safe_serialization=True, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").exists()
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("model_type", ["mistral", "gpt2"])
def test_non_llama_refused(sharded, tmp_path, model_type):
    hf = _copy(sharded, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    arch = {"mistral": "MistralForCausalLM", "gpt2": "GPT2LMHeadModel"}[model_type]
    (hf / "config.json").write_text(json.dumps({**cfg, "model_type": model_type, "architectures": [arch]}))
    expect_usage_error(hf, tmp_path / "out", match=model_type)
    assert not (tmp_path / "out").exists()


def test_missing_shard(sharded, tmp_path):
    hf = _copy(sharded, tmp_path / "hf")
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    shard.unlink()
    expect_usage_error(hf, tmp_path / "out", match=shard.name)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch(sharded, tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _copy(sharded, tmp_path / "hf")
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.self_attn.k_proj.weight"
    state = load_file(hf / index[name])
    state[name] = state[name][:16].contiguous()
    save_file(state, hf / index[name], metadata={"format": "pt"})
    line = expect_usage_error(hf, tmp_path / "out", match=name)
    assert "[16, 64]" in line and "[32, 64]" in line
    assert not (tmp_path / "out").exists()


def test_missing_and_extra_tensor(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    _, hf_src, _, _ = converted
    for change, match in (("drop", "model.norm.weight is missing"), ("add", "unexpected tensor extra.weight")):
        hf = _copy(hf_src, tmp_path / change)
        state = load_file(hf / "model.safetensors")
        if change == "drop":
            del state["model.norm.weight"]
        else:
            state["extra.weight"] = torch.zeros(2)
            state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # ignored
        save_file(state, hf / "model.safetensors")
        expect_usage_error(hf, tmp_path / f"out_{change}", match=match)
        assert not (tmp_path / f"out_{change}").exists()


def test_other_refusals(sharded, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    expect_usage_error(sharded, dest, match="not empty")
    assert os.listdir(dest) == ["keep.txt"]
    expect_usage_error(tmp_path / "nowhere", tmp_path / "out", match="config.json")
    expect_usage_error(sharded, tmp_path / "out", "--tp", "4", match="KV heads")
    r = run_cli("convert", "--from-mcore", tmp_path / "nowhere", "--to-hf", tmp_path / "out")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "megarope.json" in r.stderr
    assert not (tmp_path / "out").exists()
