"""Run orchestration: planning and labels, one model alive at a time in the checkpoint loop, the
result log that a rerun resumes from."""

import gc
import weakref

import pytest
from eval_helpers import corpus_texts, save_toy_checkpoint

from megarope import lineage
from megarope.errors import UsageError
from megarope.eval import perplexity, runs
from megarope.eval.variants import parse_variant


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    return save_toy_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt")


def test_checkpoint_labels():
    assert runs.checkpoint_labels(["/a/base-1e6", "/b/base-500"]) == ["base-1e6", "base-500"]
    assert runs.checkpoint_labels(["/a/x/ckpt", "/b/x/ckpt"]) == ["a/x/ckpt", "b/x/ckpt"]
    assert runs.checkpoint_labels(["/r/run1/step_0000100", "/r/run2/step_0000100"]) == \
        ["run1/step_0000100", "run2/step_0000100"]


def test_plan_runs(toy_ckpt):
    planned = runs.plan_runs([toy_ckpt], [parse_variant("as-trained"), parse_variant("dynamic-ntk+base=500")])
    assert [r.name for r in planned] == ["ckpt:as-trained", "ckpt:dynamic-ntk+base=500"]
    assert planned[1].rope["base"] == 500 and planned[1].rope["dynamic_ntk"] and not planned[0].rope["dynamic_ntk"]
    assert planned[0].preset.num_layers == 4 and planned[0].tokenizer.spec == "bytes"
    bound, regime = lineage.predicted_bound(planned[0].meta, 10000.0)  # trained at the pretraining base: 128
    assert bound == 128 and isinstance(regime, str)
    with pytest.raises(UsageError, match="given twice"):
        runs.plan_runs([toy_ckpt, toy_ckpt], [parse_variant("as-trained")])


def test_the_checkpoint_loop_holds_one_model_at_a_time(toy_ckpt, monkeypatch):
    """Each model is gone (garbage collected, not merely unreferenced by the loop) before the next loads."""
    alive, seen_at_load = [], []
    load = runs.load_run_model

    def tracked(*args, **kwargs):
        gc.collect()
        seen_at_load.append(sum(ref() is not None for ref in alive))
        model = load(*args, **kwargs)
        alive.append(weakref.ref(model))
        return model

    monkeypatch.setattr(runs, "load_run_model", tracked)
    records = perplexity.run([toy_ckpt], corpus_texts(), [256], ["as-trained", "base=500", "dynamic-ntk"],
                             verbose=False)
    assert len(records) == 3 and len(alive) == 3
    assert seen_at_load == [0, 0, 0]
    gc.collect()
    assert all(ref() is None for ref in alive)


def test_each_run_frees_the_model_when_the_evaluation_fails(toy_ckpt, monkeypatch):
    alive = []
    load = runs.load_run_model
    monkeypatch.setattr(runs, "load_run_model", lambda *a, **k: alive.append(weakref.ref(m := load(*a, **k))) or m)

    def failing(run, model):
        raise RuntimeError("boom")

    from megarope import parallel

    parallel.init()
    with pytest.raises(RuntimeError, match="boom"):
        list(runs.each_run(runs.plan_runs([toy_ckpt], [parse_variant("as-trained")]), failing))
    gc.collect()
    assert len(alive) == 1 and alive[0]() is None


def test_result_log():
    written = []
    log = runs.ResultLog(lambda records: written.append(len(records)), resumed=[{"run": "a", "length": 256}])
    assert log.done("a", 256) and not log.done("a", 512) and log.pending("a", [256, 512]) == [512]
    log.add({"run": "a", "length": 512})
    assert written == [2] and log.pending("a", [256, 512]) == []


# ----------------------------------------------------------------------------------------------- HF directories
@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A random tiny Llama-3-style HF directory with its own BPE tokenizer, its conversion, and a document."""
    from hf_models import TEXTS, random_hf

    from megarope import convert, parallel

    root = tmp_path_factory.mktemp("hf_llama")
    random_hf(root / "hf", "llama", tokenizer="llama3", rope_theta=500.0)
    try:
        convert.hf_to_mcore(str(root / "hf"), str(root / "mcore"))
    finally:
        parallel.destroy()
    (root / "doc.txt").write_text(" ".join(TEXTS * 30))
    return root


def test_eval_of_an_hf_directory_equals_eval_of_its_conversion(hf_llama):
    """eval of HF_DIR (converted in memory, its own tokenizer) == eval of `convert`'s checkpoint of it."""
    records = perplexity.run([str(hf_llama / "hf"), str(hf_llama / "mcore")], [str(hf_llama / "doc.txt")], [64, 256],
                             ["as-trained", "dynamic-ntk"], verbose=False)
    records = {(r["run"], r["length"]): r for r in records}
    assert len(records) == 8
    for (name, length), rec in records.items():
        if name.startswith("hf:"):
            converted = records["mcore:" + name.removeprefix("hf:"), length]
            for key in ("loss", "accuracy", "n_docs", "n_tokens", "predicted_bound", "pretrain_len", "pretrain_base"):
                assert rec[key] == converted[key], (name, length, key)
            assert rec["tokenizer"] == str(hf_llama / "hf")
            assert converted["tokenizer"] == str(hf_llama / "mcore" / "tokenizer")
    assert records["hf:as-trained", 64]["n_docs"] == 1 and records["hf:as-trained", 64]["pretrain_base"] == 500.0
    assert records["hf:dynamic-ntk", 256]["loss"] != records["hf:as-trained", 256]["loss"]
    assert not any(p.name.startswith(".") or p.name == "megarope.json" for p in (hf_llama / "hf").iterdir())


def test_passkey_of_an_hf_directory_equals_passkey_of_its_conversion(hf_llama):
    from megarope.eval import passkey

    got = [passkey.run(str(hf_llama / name), [256], [0.0, 1.0], trials=2, verbose=False) for name in ("hf", "mcore")]
    assert got[0]["digit_accuracy"] == got[1]["digit_accuracy"] and got[0]["accuracy"] == got[1]["accuracy"]
    assert got[0]["tokenizer"] == str(hf_llama / "hf")


def test_tokenizers_and_checkpoints_that_cannot_be_this_model_are_refused(hf_llama, tmp_path, monkeypatch):
    """Each refused before any weight is read (the damaged file: before it loads); UsageError is the
    CLI's one line with exit 2."""
    import json
    import shutil

    from hf_models import tokenizer_dir

    hf, mcore = hf_llama / "hf", hf_llama / "mcore"
    unsupported = shutil.copytree(hf, tmp_path / "gpt2")
    cfg = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3",
                                                         "architectures": ["Qwen3ForCausalLM"]}))
    big = shutil.copytree(hf, tmp_path / "big_vocab")  # its own tokenizer: more tokens than the 300 of the model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (big / name).unlink()
    tokenizer_dir(big, "llama3", vocab_size=400)  # as many as its training text makes (354)
    (tmp_path / "no_tokenizer").mkdir()
    (tmp_path / "no_tokenizer" / "vocab.txt").write_text("a\n")
    other = tokenizer_dir(tmp_path / "other_tok", "qwen2")  # 300 tokens too, but another tokenizer
    damaged = shutil.copytree(mcore, tmp_path / "damaged")
    shard = sorted((damaged / "model").glob("*.distcp"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    cases = [
        (unsupported, None, "model_type 'qwen3' .* does not convert: megarope converts the llama"),
        (big, None, "tokens, but the model of .*big_vocab has a vocabulary of 300: not this model's tokenizer"),
        (mcore, tmp_path / "no_tokenizer", "neither tokenizer.json nor tokenizer_config.json"),
        (mcore, other, "is not the 300-token tokenizer .* was made with"),
        (hf, other, "their contents differ"),
        (mcore, "bytes", "byte tokens"),
        (damaged, None, "damaged.*SHA-256 differs"),
    ]
    for ckpt, tokenizer, match in cases:
        with pytest.raises(UsageError, match=match):
            perplexity.run([str(ckpt)], [str(hf_llama / "doc.txt")], [64], tokenizer=tokenizer and str(tokenizer),
                           out_dir=str(tmp_path / "out"), verbose=False)
    assert not (tmp_path / "out").exists()
    checked = []
    monkeypatch.setattr(runs.checkpoint, "verify_checkpoint", lambda path: checked.append(path))
    perplexity.run([str(mcore)], [str(hf_llama / "doc.txt")], [64], ["as-trained", "base=1000"], verbose=False)
    assert checked == [str(mcore)]  # once per checkpoint, however many variants read it


@pytest.mark.slow
def test_an_unsupported_family_is_one_line(hf_llama, tmp_path):
    """The CLI takes an HF directory as --checkpoint and says in one line, exit 2, what it cannot convert."""
    import json
    import shutil
    import subprocess

    from eval_helpers import CLI, REPO

    unsupported = shutil.copytree(hf_llama / "hf", tmp_path / "gpt2")
    cfg = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2",
                                                         "architectures": ["GPT2LMHeadModel"]}))
    r = subprocess.run([*CLI, "eval", "--checkpoint", str(unsupported), "--data", str(hf_llama / "doc.txt"),
                        "--lengths", "64", "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "megarope converts the llama (Llama-2, Llama-3.x), mistral and qwen2 families" in lines[0]
