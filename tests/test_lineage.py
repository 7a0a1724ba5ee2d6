"""The lineage: what config.json and the user's flags say, what older checkpoints imply, what training carries
forward, and the bound predicted from it (with the rotary dimension)."""

import json

import pytest

from megarope import lineage as L
from megarope import scaling

LLAMA31 = {"model_type": "llama", "max_position_embeddings": 131072,
           "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "original_max_position_embeddings": 8192}}
PRESET = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 128,
          "vocab_size": 300, "max_seq_len": 2048}


def test_from_hf_config_and_its_sources():
    lin = L.from_hf_config(LLAMA31)
    assert (lin.pretrain_base, lin.pretrain_len, lin.tune_len) == (5e5, 8192, 131072)
    assert lin.sources == {"pretrain_base": "config.json rope_parameters.rope_theta",
                           "pretrain_len": "config.json rope_parameters.original_max_position_embeddings",
                           "tune_len": "config.json max_position_embeddings"}
    old_form = L.from_hf_config({"max_position_embeddings": 4096, "rope_theta": 1e4})
    assert (old_form.pretrain_base, old_form.pretrain_len, old_form.sources["pretrain_base"]) == \
        (1e4, 4096, "config.json rope_theta")
    phi3_like = L.from_hf_config({"max_position_embeddings": 131072, "original_max_position_embeddings": 4096})
    assert phi3_like.pretrain_len == 4096 and phi3_like.pretrain_base == 10000.0
    assert "default" in phi3_like.sources["pretrain_base"]


def test_flags_replace_what_config_json_hides():
    """Pretrained at 2K with base 1e4, extended to 8K with base 1e5: config.json shows only the latter."""
    cfg = {"max_position_embeddings": 8192, "rope_theta": 1e5}
    lin = L.from_hf_config(cfg, pretrain_base=1e4, pretrain_len=2048)
    assert (lin.pretrain_base, lin.pretrain_len, lin.tune_len) == (1e4, 2048, 8192)
    assert lin.sources["pretrain_base"] == "--pretrain-base" and lin.sources["pretrain_len"] == "--pretrain-len"
    assert lin.sources["tune_len"] == "config.json max_position_embeddings"
    assert "pretrain len 2,048  (--pretrain-len)" in lin.describe()
    with pytest.raises(ValueError, match="base"):
        L.from_hf_config(cfg, pretrain_base=1.0)


def test_lineage_of_recorded_and_older_checkpoints():
    recorded = L.from_hf_config(LLAMA31).to_dict()
    assert L.lineage_of({"lineage": json.loads(json.dumps(recorded))}) == L.from_hf_config(LLAMA31)
    # converted before lineages: what its config.json says
    converted = {"source": "hf", "hf_config": LLAMA31, "preset": PRESET, "rope": {"train_len": 131072}}
    assert L.lineage_of(converted).pretrain_len == 8192
    # trained before lineages: LLaMA's base, the preset's length, the RoPE train_len -- what megarope assumed then
    trained = {"preset": PRESET, "rope": {"base": 1e6, "train_len": 16384}}
    lin = L.lineage_of(trained)
    assert (lin.pretrain_base, lin.pretrain_len, lin.tune_len, lin.effective_tune_len) == (1e4, 2048, 16384, 16384)
    assert "without a lineage" in lin.sources["pretrain_base"]
    explicit = L.lineage_of({**trained, "pretrain_base": 5e5, "pretrain_len": 4096})
    assert (explicit.pretrain_base, explicit.pretrain_len) == (5e5, 4096)


def test_training_lineage_carries_the_pretraining_forward():
    parent = {"lineage": L.from_hf_config(LLAMA31).to_dict()}
    lin = L.training_lineage(parent, base=1e6, seq_len=16384)
    assert (lin.pretrain_base, lin.pretrain_len, lin.tune_len) == (5e5, 8192, 16384)
    assert lin.sources["pretrain_base"] == "config.json rope_parameters.rope_theta"
    assert lin.sources["tune_len"] == "train.seq_len"
    scratch = L.training_lineage(None, base=1e4, seq_len=128)
    assert (scratch.pretrain_base, scratch.pretrain_len, scratch.tune_len) == (1e4, 128, 128)
    shorter = L.training_lineage(parent, base=1e6, seq_len=64)  # tuned shorter than pretrained: still saw 8192
    assert shorter.tune_len == 64 and shorter.effective_tune_len == 8192


def test_with_packed_documents_the_tune_length_is_the_longest_document():
    """Positions or attention restarting at each document: no query sees farther than its document is long, so
    the run trained at its longest document's length; train.seq_len only bounds it until one is recorded."""
    parent = {"lineage": L.from_hf_config(LLAMA31).to_dict()}
    measured = L.training_lineage(parent, base=1e6, seq_len=16384, documents=True, longest_document=9000)
    assert (measured.pretrain_len, measured.tune_len) == (8192, 9000)
    assert measured.sources["tune_len"].startswith("the longest document trained on") and "16384" in \
        measured.sources["tune_len"]
    bound = L.training_lineage(parent, base=1e6, seq_len=16384, documents=True)
    assert bound.tune_len == 16384 and "an upper bound" in bound.sources["tune_len"]
    scratch = L.training_lineage(None, base=1e4, seq_len=128, documents=True, longest_document=70)
    assert (scratch.pretrain_len, scratch.tune_len) == (70, 70)
    assert scratch.sources["pretrain_len"] == "this run's longest document (trained from random weights)"
    assert L.lineage_of({"lineage": measured.to_dict()}) == measured  # what plan --from and eval read back


@pytest.mark.parametrize("rotary_percent, kv_channels", [(1.0, None), (0.25, None), (1.0, 32)])
def test_predicted_bound_uses_the_rotary_dimension(rotary_percent, kv_channels):
    meta = {"preset": {**PRESET, "kv_channels": kv_channels},
            "rope": {"base": 1e6, "train_len": 4096, "rotary_percent": rotary_percent},
            "lineage": {"pretrain_base": 1e4, "pretrain_len": 2048, "tune_len": 4096}}
    d = int((kv_channels or 16) * rotary_percent)
    assert L.rotary_dim_of(meta) == d
    bound, regime = L.predicted_bound(meta, 1e6)
    expected = scaling.plan_base(d, 2048, 1e6, 4096, 1e4)
    assert (bound, regime) == (expected.extrapolation_bound, expected.regime) and bound is not None
    assert L.predicted_bound(meta, 5.0) == (None, scaling.BELOW_BETA3)


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Could not determine rank")
def test_llama3_like_model_continued_with_a_new_base_keeps_its_lineage(tmp_path, capsys):
    """A Llama-3-like model (theta 500000, 8192 positions, its own BPE tokenizer) converted, preprocessed with
    the tokenizer it carries, and continued for two steps with base 1e6: the checkpoint says 500000 and 8192."""
    from hf_models import TEXTS, random_hf

    from megarope import checkpoint, config, convert, data, parallel, train
    from megarope.cli import main

    random_hf(tmp_path / "hf", "llama", tokenizer="llama3", max_position_embeddings=8192, rope_theta=500000.0)
    try:
        convert.hf_to_mcore(str(tmp_path / "hf"), str(tmp_path / "mcore"))
    finally:
        parallel.destroy()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t * 8}) + "\n" for t in TEXTS * 4))
    prefix = data.preprocess([str(corpus)], checkpoint.tokenizer_path(str(tmp_path / "mcore")),
                             str(tmp_path / "data"))["prefix"]
    cfg = config.validate({"rope": {"base": 1e6}, "init": {"from": str(tmp_path / "mcore")},
                           "train": {"steps": 2, "seq_len": 64, "global_batch": 2, "micro_batch": 1, "lr": 1e-4,
                                     "warmup_steps": 0},
                           "data": {"path": prefix}, "checkpoint": {"dir": str(tmp_path / "run")},
                           "log": {"tensorboard": False}})
    try:
        summary = train.run(cfg, progress=False)
    finally:
        parallel.destroy()
    banner = capsys.readouterr().out
    meta = checkpoint.read_meta(summary["checkpoint"])
    assert meta["rope"]["base"] == 1e6
    assert {k: meta["lineage"][k] for k in L.FIELDS} == {"pretrain_base": 5e5, "pretrain_len": 8192, "tune_len": 64}
    assert meta["lineage"]["sources"]["pretrain_base"] == "config.json rope_parameters.rope_theta"
    assert "pretrain base 500,000  (config.json rope_parameters.rope_theta)" in banner
    assert "train length 8192" in banner and "(pretraining base 5e+05)" in banner
    assert data.load_tokenizer(checkpoint.tokenizer_path(summary["checkpoint"])).digest == \
        data.load_tokenizer(tmp_path / "hf").digest  # the HF tokenizer travelled on into the training checkpoint
    assert meta["tokenizer_digest"] == data.load_tokenizer(tmp_path / "hf").digest  # and is recorded by content
    expected = scaling.plan_base(16, 8192, 1e6, 8192, 5e5)
    assert L.predicted_bound(meta, 1e6) == (expected.extrapolation_bound, expected.regime)
    assert main(["plan", "--from", str(tmp_path / "run"), "--json"]) == 0  # a training run: its latest step
    plan = json.loads(capsys.readouterr().out)
    assert (plan["train_len"], plan["pretrain_base"], plan["bases"][0]["base"]) == (8192, 5e5, 1e6)
    assert plan["bases"][0]["extrapolation_bound"] == expected.extrapolation_bound
    # eval predicts the bound from that lineage too (500000 and 8192, not LLaMA's 10000)
    from megarope.eval import perplexity

    (rec,) = perplexity.run([str(tmp_path / "run")], [str(corpus)], [64], verbose=False)
    assert (rec["base"], rec["pretrain_base"], rec["pretrain_len"]) == (1e6, 5e5, 8192)
    assert (rec["predicted_bound"], rec["regime"]) == (expected.extrapolation_bound, expected.regime)
    assert rec["predicted_bound"] != scaling.plan_base(16, 8192, 1e6, 8192, 1e4).extrapolation_bound
