"""HF <-> megarope conversion for the llama, mistral and qwen2 families: logits equal to transformers' at TP=1,
TP=2 and CP=2 (converted and in memory), every RoPE scaling type, exact round trips with the tokenizer, what
convert says it did, and one-line errors for bad inputs."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from distributed import run_distributed
from hf_models import hf_config, hf_logits, random_hf, tokenizer_dir

from megarope.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 64
VOCAB = 300  # the tokenizers' size; qwen2's model pads its vocabulary to 320 beyond it
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
          "high_freq_factor": 2.0, "original_max_position_embeddings": 32}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
CASES = {  # name: (family, tokenizer style, config overrides)
    "llama2": ("llama", "llama2", {"rope_theta": 500.0}),
    # Llama-3.2's traits: tied embeddings, llama3 RoPE scaling; and a head dim other than hidden/heads (32 vs 16)
    "llama3.2": ("llama", "llama3", {"tie_word_embeddings": True, "head_dim": 32, "rope_parameters": LLAMA3}),
    "mistral": ("mistral", "llama2", {"rope_theta": 1e6}),
    "qwen2": ("qwen2", "qwen2", {"vocab_size": 320, "rope_parameters": YARN}),
}


def tokens_for(vocab=VOCAB):
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(7))


def convert(hf_dir, out_dir, tp=1, **kwargs):
    from megarope import convert as conv, parallel

    try:
        return conv.hf_to_mcore(str(hf_dir), str(out_dir), tp, **kwargs)
    finally:
        parallel.destroy()


def _local_batch(tokens):
    from megarope import parallel

    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    return parallel.slice_for_cp({"tokens": tokens, "position_ids": position_ids})


def mcore_logits(ckpt_dir, tokens, tp=1, cp=1):
    """This rank's logits of a converted checkpoint: [b, s/cp (its two CP chunks), padded_vocab/tp]."""
    from megarope import checkpoint, parallel

    parallel.init(tp=tp, cp=cp)
    local = _local_batch(tokens)
    model = checkpoint.build_from_checkpoint(str(ckpt_dir)).eval()
    with torch.no_grad():
        return model(local["tokens"], local["position_ids"], None)


def in_memory_logits(hf_dir, tokens, tp=1, cp=1):
    """The same from the HF directory itself, converted in memory (convert.load_hf)."""
    from megarope import convert as conv, parallel

    parallel.init(tp=tp, cp=cp)
    local = _local_batch(tokens)
    model, _ = conv.load_hf(str(hf_dir))
    with torch.no_grad():
        return model.eval()(local["tokens"], local["position_ids"], None)


def _tp2_and_cp2(ckpt_dirs, hf_dirs, tokens):
    out = {}
    for layout in ("tp", "cp"):
        for name, path in ckpt_dirs.items():
            out[name, layout] = mcore_logits(path, tokens, **{layout: 2})
        for name, path in hf_dirs.items():
            out[name + " in memory", layout] = in_memory_logits(path, tokens, **{layout: 2})
    return out


def assemble_cp(pieces):
    """Put each CP rank's two chunks (r and 2*CP-1-r) back in sequence order."""
    from megarope.parallel import cp_chunk_ids

    cp = len(pieces)
    chunks = {}
    for rank, local in enumerate(pieces):
        for slot, cid in enumerate(cp_chunk_ids(cp, rank)):
            chunks[cid] = local.chunk(2, dim=1)[slot]
    return torch.cat([chunks[c] for c in range(2 * cp)], dim=1)


def close(got, expected):
    return (got[..., :expected.shape[-1]] - expected).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """For each case: (HF model, its dir, the converted megarope dir, conversion metadata, HF logits)."""
    out = {}
    for i, (name, (family, style, overrides)) in enumerate(CASES.items()):
        root = tmp_path_factory.mktemp(name)
        model = random_hf(root / "hf", family, seed=i, tokenizer=style, **overrides)
        meta = convert(root / "hf", root / "mcore")
        out[name] = model, root / "hf", root / "mcore", meta, hf_logits(model, tokens_for())
    return out


@pytest.mark.parametrize("name", CASES)
def test_logits_tp1(models, name):
    model, _, mcore, meta, expected = models[name]
    assert meta["family"] == CASES[name][0] and meta["source"] == "hf"
    got = mcore_logits(mcore, tokens_for())
    assert got.shape == (2, SEQ, 384) and close(got, expected)
    assert expected.std() > 0.5  # logits large enough for the comparison to mean something


def test_preset_fields_of_each_family(models):
    metas = {name: models[name][3]["preset"] for name in CASES}
    assert metas["llama3.2"]["tie_embeddings"] and metas["llama3.2"]["kv_channels"] == 32
    assert metas["qwen2"]["qkv_bias"] and metas["qwen2"]["vocab_size"] == 320
    assert not any(metas[n]["tie_embeddings"] or metas[n]["qkv_bias"] for n in ("llama2", "mistral"))
    rope = models["qwen2"][3]["rope"]
    assert rope["yarn"]["factor"] == 4.0 and rope["yarn"]["original_len"] == 32
    assert models["llama3.2"][3]["rope"]["llama3_high_freq_factor"] == 2.0


@pytest.mark.slow
def test_logits_tp2_and_cp2(models):
    ckpts = {name: str(models[name][2]) for name in CASES}
    hf_dirs = {name: str(models[name][1]) for name in ("llama3.2", "qwen2")}
    r0, r1 = run_distributed(_tp2_and_cp2, 2, ckpts, hf_dirs, tokens_for())
    for key in list(CASES) + [n + " in memory" for n in hf_dirs]:
        expected = models[key.removesuffix(" in memory")][4]
        tp = torch.cat([r0[key, "tp"], r1[key, "tp"]], dim=-1)
        cp = assemble_cp([r0[key, "cp"], r1[key, "cp"]])
        assert tp.shape == cp.shape == (2, SEQ, 384), key
        assert close(tp, expected) and close(cp, expected), key


def test_in_memory_equals_converted(models):
    from megarope import checkpoint, convert as conv, parallel

    _, hf, mcore, meta, _ = models["qwen2"]
    parallel.init(tp=1)
    model, mem_meta = conv.load_hf(str(hf))
    converted = checkpoint.build_from_checkpoint(str(mcore))
    a, b = model.state_dict(), converted.state_dict()
    tensors = [k for k in a if torch.is_tensor(a[k])]
    assert tensors and all(torch.equal(a[k], b[k]) for k in tensors)
    assert mem_meta["tokenizer"] == os.path.abspath(hf) and mem_meta["lineage"] == meta["lineage"]
    assert not any(p.name.startswith(".") for p in hf.parent.iterdir())  # nothing written beside it


# ---------------------------------------------------------------------------- reading an HF directory once
VARIANTS = [None, {"base": 1e4}, {"base": 50.0}]  # RoPE variants of one checkpoint: the same weights


def _variants_from_one_reading(hf_dir, tokens):
    """At TP=2, then at CP=2: each variant's logits on this rank and the bytes this rank has read after it."""
    from megarope import convert as conv, parallel

    out = {}
    for layout in ("tp", "cp"):
        parallel.init(**{layout: 2})
        hf, local = conv.HFCheckpoint(hf_dir), _local_batch(tokens)
        for i, overrides in enumerate(VARIANTS):
            with torch.no_grad():
                out[layout, i] = hf.model("local", overrides).eval()(local["tokens"], local["position_ids"], None)
            out[layout, i, "bytes"] = hf.source.weights.bytes_read
    return out


def _tensor_bytes(hf_dir) -> tuple[int, int]:
    """(bytes of every tensor of the directory, bytes of the 1-D ones: the norms, which every TP rank holds)."""
    from safetensors import safe_open

    with safe_open(os.path.join(hf_dir, "model.safetensors"), "pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys()]
    return sum(t.nbytes for t in tensors), sum(t.nbytes for t in tensors if t.dim() == 1)


@pytest.mark.slow
def test_an_hf_directory_is_read_once_for_all_variants_each_rank_its_tp_shard_one_rank_per_cp_group(models):
    """load_hf read every tensor whole on every rank, again for each variant: a 7B in 4 variants on 8 GPUs
    read 32 full copies. Now each TP rank reads its shard and one rank of a CP (or DP) group reads for it,
    once for every variant; the logits are those of a model loaded whole."""
    from megarope import convert as conv, parallel

    model, hf_dir, _, _, expected = models["llama2"]
    r0, r1 = run_distributed(_variants_from_one_reading, 2, str(hf_dir), tokens_for())
    total, norms = _tensor_bytes(hf_dir)
    for layout in ("tp", "cp"):
        read = [[r[layout, i, "bytes"] for i in range(len(VARIANTS))] for r in (r0, r1)]
        assert all(len(set(rank)) == 1 for rank in read), read  # nothing more read for the second variant
    assert r0["tp", 0, "bytes"] + r1["tp", 0, "bytes"] == total + norms  # the shards, and the norms on each
    assert max(r0["tp", 0, "bytes"], r1["tp", 0, "bytes"]) < 0.6 * total
    assert (r0["cp", 0, "bytes"], r1["cp", 0, "bytes"]) == (total, 0)  # rank 1 received rank 0's weights
    parallel.init()
    for i, overrides in enumerate(VARIANTS):
        whole = conv.load_hf(str(hf_dir), rope_overrides=overrides)[0].eval()
        with torch.no_grad():
            alone = whole(tokens_for(), torch.arange(SEQ).expand(2, SEQ), None)
        assert close(torch.cat([r0["tp", i], r1["tp", i]], dim=-1), alone[..., :VOCAB]), i
        assert close(assemble_cp([r0["cp", i], r1["cp", i]]), alone[..., :VOCAB]), i
        assert close(alone, expected) == (i == 0)  # transformers' model is the as-trained one


def test_eval_of_an_hf_directory_in_several_variants_reads_it_once(models, monkeypatch):
    from megarope import convert as conv
    from megarope.eval import perplexity

    from eval_helpers import corpus_texts

    _, hf_dir, _, _, _ = models["llama2"]
    read, counted = conv.HFWeights.read, []

    def counting(self, name, index=None):
        tensor = read(self, name, index)
        counted.append(tensor.nbytes)
        return tensor

    monkeypatch.setattr(conv.HFWeights, "read", counting)
    records = perplexity.run([str(hf_dir)], corpus_texts(), [64], ["as-trained", "base=1e4", "base=50"], verbose=False)
    assert len(records) == 3 and len({r["loss"] for r in records}) == 3
    assert sum(counted) == _tensor_bytes(hf_dir)[0]  # one reading of every tensor, not one per variant


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16, "beta_slow": 2,
     "truncate": False},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.707,
     "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 1.3},
], ids=["linear", "dynamic", "llama3", "yarn", "yarn-mscale", "yarn-attention-factor"])
def test_rope_scaling_logits(tmp_path, rope):
    """Every RoPE scaling type of config.json, exactly: the in-memory model's logits are transformers'."""
    # max_position_embeddings 32 < SEQ so that dynamic NTK is active
    model = random_hf(tmp_path / "hf", "llama", tokenizer=None, max_position_embeddings=32,
                      rope_parameters={"rope_theta": 1000.0, **rope})
    got = in_memory_logits(tmp_path / "hf", tokens_for())
    assert close(got, hf_logits(model, tokens_for()))


@pytest.mark.parametrize("name", ["llama3.2", "qwen2"])
def test_round_trip(models, name, tmp_path):
    from transformers import AutoModelForCausalLM

    from megarope import convert as conv, data, parallel

    _, hf, mcore, _, expected = models[name]
    try:
        cfg = conv.mcore_to_hf(str(mcore), str(tmp_path / "hf"))
    finally:
        parallel.destroy()
    original = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == original["model_type"] and cfg["tie_word_embeddings"] == original["tie_word_embeddings"]
    assert cfg["rope_parameters"] == {k: v for k, v in cfg["rope_parameters"].items()} and \
        cfg["rope_parameters"]["rope_type"] == original["rope_parameters"]["rope_type"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert torch.equal(hf_logits(back, tokens_for()), expected)
    assert data.load_tokenizer(tmp_path / "hf").digest == data.load_tokenizer(hf).digest


def test_tokenizer_travels_and_bos_follows_its_config(models):
    from megarope import checkpoint, data

    for name, bos in (("llama2", 1), ("llama3.2", 0), ("qwen2", None)):
        _, hf, mcore, meta, _ = models[name]
        assert meta["tokenizer"] == "tokenizer" and sorted(os.listdir(mcore / "tokenizer")) == \
            ["tokenizer.json", "tokenizer_config.json"]
        tok = data.load_tokenizer(checkpoint.tokenizer_path(str(mcore)))
        assert (tok.bos, meta["tokenizer_bos"], tok.vocab_size) == (bos, bos, VOCAB), name
        assert tok.digest == data.load_tokenizer(hf).digest == meta["tokenizer_digest"]


def test_config_forms():
    from megarope.convert import hf_fields

    base = {**hf_config("llama").to_dict(), "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    base.pop("rope_parameters", None)
    old = hf_fields({**base, "rope_theta": 5e5})[2]
    new = hf_fields({**base, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})[2]
    assert old == new == {"base": 5e5, "train_len": 128}
    assert hf_fields(base)[2]["base"] == 10000.0
    old_linear = hf_fields({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4}})[2]
    assert old_linear == {"base": 5e5, "train_len": 128, "linear_factor": 4.0}
    dynamic = hf_fields({**base, "rope_parameters": {"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2.0,
                                                     "original_max_position_embeddings": 64}})[2]
    assert dynamic == {"base": 1e4, "train_len": 128, "dynamic_ntk": True, "ntk_alpha": 2.0}  # as transformers does
    llama3 = hf_fields({**base, "rope_parameters": {"rope_theta": 1e4, "rope_type": "llama3", "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0}})[2]
    assert llama3["llama3_factor"] == 8.0 and llama3["llama3_original_len"] == 128  # transformers' default
    yarn = hf_fields({**base, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                               "attention_factor": 1.2}, "rope_theta": 1e4})[2]["yarn"]
    from megarope.rope import Yarn

    assert Yarn(**yarn).attention_factor == pytest.approx(1.2, rel=1e-12)


def test_bin_checkpoint_reads_like_safetensors(models, tmp_path):
    from safetensors.torch import load_file

    from megarope.convert import HFWeights

    _, hf, _, _, _ = models["llama2"]
    state = load_file(hf / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(hf / "config.json", tmp_path / "config.json")
    weights = HFWeights(str(tmp_path))
    assert weights.shapes == {k: tuple(v.shape) for k, v in state.items()}
    assert all(torch.equal(weights[k], v) for k, v in state.items())


# ---------------------------------------------------------------------------- what convert says
def run_cli(*args):
    # parallel.init in this process leaves MASTER_PORT in os.environ: a child must pick its own
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, "-m", "megarope", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env)


def test_cli_output_old_config_form_and_lineage_flags(models, tmp_path):
    _, hf, _, _, _ = models["llama3.2"]
    old = shutil.copytree(hf, tmp_path / "hf_old")
    cfg = json.loads((old / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg.update(rope_theta=params.pop("rope_theta"), rope_scaling=params)  # the older form
    (old / "config.json").write_text(json.dumps(cfg))
    r = run_cli("convert", "--from-hf", old, "--to", tmp_path / "mcore", "--tp", "2", "--pretrain-len", "16",
                "--pretrain-base", "1e4")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "embeddings: kept tied" in out
    assert "tokenizer: 300 tokens, copied to tokenizer (tokenizer.json, tokenizer_config.json); BOS id 0" in out
    assert "rope_type llama3 -> base 500000, Llama-3 scaling x4" in out
    assert "pretrain base 10,000  (--pretrain-base)" in out and "pretrain len 16  (--pretrain-len)" in out
    assert "tune len 128  (config.json max_position_embeddings)" in out
    meta = json.loads((tmp_path / "mcore" / "megarope.json").read_text())
    assert meta["intended_tp"] == 2 and meta["rope"]["base"] == 500000.0
    assert {k: meta["lineage"][k] for k in ("pretrain_base", "pretrain_len", "tune_len")} == \
        {"pretrain_base": 1e4, "pretrain_len": 16, "tune_len": 128}


# ---------------------------------------------------------------------------- bad inputs
def expect_usage_error(hf_dir, dest, *extra, match=""):
    r = run_cli("convert", "--from-hf", hf_dir, "--to", dest, *extra)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("megarope: error: ") and match in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(hf_config("llama")).save_pretrained(path, safe_serialization=True, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").exists()
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _set_config(hf, **changes):
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_unsupported_family_refused(sharded, tmp_path):
    hf = _copy(sharded, tmp_path / "hf")
    _set_config(hf, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    line = expect_usage_error(hf, tmp_path / "out", match="gpt2")
    assert "llama (Llama-2, Llama-3.x), mistral and qwen2" in line
    assert not (tmp_path / "out").exists()


def test_tokenizer_directory_with_neither_file_refused(sharded, tmp_path):
    (tmp_path / "empty_tok").mkdir()
    (tmp_path / "empty_tok" / "vocab.txt").write_text("a\n")
    expect_usage_error(sharded, tmp_path / "out", "--tokenizer", tmp_path / "empty_tok",
                       match="neither tokenizer.json nor tokenizer_config.json")
    assert not (tmp_path / "out").exists()


def test_refusals_before_anything_is_built(models, tmp_path):
    """Each of these is a UsageError from the checks convert makes before building (the CLI prints it as one
    line, as the tests above show), so nothing is written."""
    from megarope.convert import hf_fields, inspect_hf

    _, hf, _, _, _ = models["mistral"]
    base = json.loads((hf / "config.json").read_text())
    for changes, match in (({"sliding_window": 4096}, "sliding_window 4096"),
                           ({"sliding_window": "absent"}, "sliding_window 4096"),  # transformers' default
                           ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True},
                            "use_sliding_window"),
                           ({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "attention_bias": True},
                            "attention_bias"),
                           ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}},
                            "longrope")):
        cfg = {**base, **changes}
        if changes.get("sliding_window") == "absent":
            del cfg["sliding_window"]
        with pytest.raises(UsageError, match=match):
            hf_fields(cfg)
    big = tokenizer_dir(tmp_path / "big_tok", "llama2", vocab_size=400)
    with pytest.raises(UsageError, match="has 3.. tokens, but the model of .* has a vocabulary of 300"):
        inspect_hf(str(hf), tokenizer=str(big))
    with pytest.raises(UsageError, match="byte tokens .* vocabulary has 300 tokens"):
        inspect_hf(str(hf), tokenizer="bytes")
    # another 300-token tokenizer than the directory's own: what eval of the directory refuses, convert refuses
    from megarope.eval import runs
    from megarope.eval.variants import parse_variant

    other = tokenizer_dir(tmp_path / "other_tok", "qwen2")
    differs = r"is not the 300-token tokenizer the model of .* \(their contents differ\)"
    with pytest.raises(UsageError, match=differs) as no:
        inspect_hf(str(hf), tokenizer=str(other))
    with pytest.raises(UsageError) as evaluated:
        runs.plan_runs([str(hf)], [parse_variant("as-trained")], tokenizer=str(other))
    assert str(evaluated.value) == str(no.value)
    with pytest.raises(UsageError, match="tune length 64 .* shorter than the pretraining length 128"):
        inspect_hf(str(hf), tune_len=64)


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


def test_missing_and_extra_tensor(models, tmp_path):
    from safetensors.torch import load_file, save_file

    from megarope.convert import inspect_hf

    _, hf_src, _, _, _ = models["qwen2"]
    for change, match in (("drop", "model.layers.0.self_attn.k_proj.bias is missing"),
                          ("add", "unexpected tensor extra.weight")):
        hf = _copy(hf_src, tmp_path / change)
        state = load_file(hf / "model.safetensors")
        if change == "drop":
            del state["model.layers.0.self_attn.k_proj.bias"]
        else:
            state["extra.weight"] = torch.zeros(2)
            state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # ignored
        save_file(state, hf / "model.safetensors")
        with pytest.raises(UsageError, match=match):
            inspect_hf(str(hf))


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
