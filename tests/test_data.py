import json
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.tokenizers import MegatronTokenizerBase

from hf_models import random_hf, tokenizer_dir

from megarope import data
from megarope.cli import main
from megarope.errors import UsageError

# megatron's logging warns on every read without torch.distributed; that is expected here
pytestmark = pytest.mark.filterwarnings("ignore:Could not determine rank")

WORDS = "the a cat sat on mat and dog ran to hat at an ton rat tan".split()


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def toy_texts(n, seed=0, words=WORDS):
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + "\n" for _ in range(n)]


def files_under(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------- tokenizers
def test_byte_tokenizer_round_trip():
    tok = data.load_tokenizer("bytes")
    assert isinstance(tok, MegatronTokenizerBase)
    assert (tok.vocab_size, tok.eod, tok.bos, tok.name, tok.path, tok.spec) == (257, 256, None, "bytes", None, "bytes")
    text = "def f(x):\n\treturn  x * 2  # é, 漢字, 🙂\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eod]) == text  # EOD decodes to nothing
    assert tok.tokenize(text) == ids and tok.detokenize(ids) == text  # megatron's names
    assert len(tok.vocab) == 257


def test_sentencepiece_train_load_round_trip(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", toy_texts(300))
    model = data.train_sentencepiece([corpus], 300, str(tmp_path / "sp"))
    assert model == str(tmp_path / "sp.model")
    assert files_under(tmp_path) == ["c.jsonl", "sp.model"]  # no temp file left behind

    tok = data.load_tokenizer(model)
    assert isinstance(tok, MegatronTokenizerBase)
    assert (tok.vocab_size, tok.bos, tok.eod, tok.name) == (300, 1, 2, "sentencepiece")
    assert tok.path == os.path.abspath(model) and data.load_tokenizer(tok.spec).vocab_size == 300
    seen = "the cat sat on the mat\n"
    assert tok.decode(tok.encode(seen)) == seen
    assert len(tok.encode(seen)) < len(seen) // 2  # merges were learned
    unseen = "Zoë's  2 dogs\tran 42 km\n"  # unseen characters, digits, double spaces, tab
    ids = tok.encode(unseen)
    assert 0 not in ids  # byte fallback: never <unk>
    assert tok.decode(ids) == unseen and tok.decode(ids + [tok.eod]) == unseen


def test_sentencepiece_vocab_too_small_is_a_usage_error(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["".join(map(chr, range(0x4E00, 0x4E00 + 200)))])
    with pytest.raises(UsageError, match="sentencepiece training failed"):
        data.train_sentencepiece([corpus], 300, str(tmp_path / "sp"))
    with pytest.raises(UsageError, match="at least 260"):
        data.train_sentencepiece([corpus], 100, str(tmp_path / "sp"))
    assert files_under(tmp_path) == ["c.jsonl"]


@pytest.mark.parametrize("content", [b"not a model", None])
def test_bad_tokenizer_spec(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match="tokenizer"):
        data.load_tokenizer(str(path))


# HF tokenizer directories in each family's manner: (style, BOS id, EOS id); see tests/hf_models.py
HF_STYLES = [("llama3", 0, 1),   # tokenizer.json's post-processor prepends <|begin_of_text|> (id 0)
             ("llama2", 1, 2),   # tokenizer_config.json: add_bos_token true (<s>, id 1)
             ("qwen2", None, 0),  # no BOS at all
             ("chat", None, 2)]  # names <|im_start|> as bos_token but add_bos_token is false: never added


@pytest.mark.parametrize("style, bos, eos", HF_STYLES, ids=[s[0] for s in HF_STYLES])
def test_hf_tokenizer_directory(tmp_path, style, bos, eos):
    from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import HuggingFaceTokenizer

    path = tokenizer_dir(tmp_path / "tok", style)
    tok = data.load_tokenizer(path)
    assert isinstance(tok, data.HFTokenizer) and isinstance(tok, MegatronTokenizerBase)
    assert (tok.vocab_size, tok.bos, tok.eod, tok.path) == (300, bos, eos, str(path))
    assert len(tok.vocab) == 300 and tok.spec == str(path) and data.load_tokenizer(tok.spec).vocab_size == 300
    text = "the quick brown fox, 漢字 and 🙂\n\tdef f(x): return x"
    ids = tok.encode(text)
    assert ids == HuggingFaceTokenizer(str(path), include_special_tokens=False).text_to_ids(text)  # megatron's ids
    assert bos not in ids and tok.decode(ids) == text and tok.decode([tok.eod] + ids + [tok.eod]) == text
    assert len(ids) < len(text.encode())  # merges were learned
    assert data.load_tokenizer(path / "tokenizer.json").digest == tok.digest  # the file names its directory


def test_hf_tokenizer_refusals(tmp_path):
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "vocab.txt").write_text("a\n")
    with pytest.raises(UsageError, match="neither tokenizer.json nor tokenizer_config.json"):
        data.load_tokenizer(tmp_path / "neither")
    path = tokenizer_dir(tmp_path / "no_eos", "llama3")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(UsageError, match="no eos token"):
        data.load_tokenizer(path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UsageError, match="cannot read HF tokenizer"):
        data.load_tokenizer(tmp_path / "broken")


def test_copy_tokenizer_takes_only_tokenizer_files(tmp_path):
    random_hf(tmp_path / "model", "llama")  # config.json, model.safetensors and a tokenizer
    os.makedirs(tmp_path / "ckpt")
    assert data.copy_tokenizer(str(tmp_path / "model"), str(tmp_path / "ckpt")) == "tokenizer"
    assert files_under(tmp_path / "ckpt") == ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]
    assert data.load_tokenizer(tmp_path / "ckpt" / "tokenizer").digest == data.load_tokenizer(tmp_path / "model").digest
    assert data.copy_tokenizer("bytes", str(tmp_path / "ckpt")) is None


def test_digest_names_the_tokenization(tmp_path):
    """Equal files, equal digest wherever they lie; a chat template does not count, tokenizer_config.json does."""
    import shutil

    tok = tokenizer_dir(tmp_path / "tok", "llama3")
    same = shutil.copytree(tok, tmp_path / "same")
    (same / "chat_template.jinja").write_text("{{ messages }}")
    digest = data.load_tokenizer(tok).digest
    assert data.load_tokenizer(same).digest == digest
    config = json.loads((same / "tokenizer_config.json").read_text())
    (same / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    assert data.load_tokenizer(same).digest != digest
    assert data.load_tokenizer("bytes").digest == data.load_tokenizer("bytes").digest != digest


def test_check_tokenizer(tmp_path):
    tok = data.load_tokenizer(tokenizer_dir(tmp_path / "tok", "qwen2"))
    other = data.load_tokenizer(tokenizer_dir(tmp_path / "other", "llama3"))  # 300 tokens too, other contents
    data.check_tokenizer(tok, 320)  # a model may pad its vocabulary beyond the tokenizer's (Qwen2 does)
    data.check_tokenizer(tok, 300, {"tokenizer_vocab_size": 300, "tokenizer_digest": tok.digest})
    data.check_tokenizer(tok, 300, carried=tok.path)
    with pytest.raises(UsageError, match="300 tokens, but the model has a vocabulary of 256"):
        data.check_tokenizer(tok, 256)
    with pytest.raises(UsageError, match="made with a tokenizer of 32,000"):
        data.check_tokenizer(tok, 32000, {"tokenizer_vocab_size": 32000})
    with pytest.raises(UsageError, match="byte tokens .* 49,152 tokens"):
        data.check_tokenizer(data.load_tokenizer("bytes"), 49152)
    data.check_tokenizer(data.load_tokenizer("bytes"), 257)
    # another tokenizer than the one the model was made with: the recorded digest, else the carried one's
    for made_with, carried in (({"tokenizer_digest": other.digest}, None), (None, other.path),
                               ({"tokenizer_digest": other.digest}, tok.path)):
        with pytest.raises(UsageError, match=r"\(300 tokens\) is not the (300-token )?tokenizer the model was made "
                                             r"with \(their contents differ\): not this model's tokenizer"):
            data.check_tokenizer(tok, 300, made_with, carried)


# ----------------------------------------------------------------------------------------------- raw text
def test_iter_documents_files_and_directories(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "z.txt").write_text("zed\n")
    (tmp_path / "d" / "sub" / "b.jsonl").write_text('{"text": "bee"}\n\n{"text": "b2", "id": 7}\n')
    (tmp_path / "d" / "ignored.csv").write_text("x,y\n")
    (tmp_path / "plain.md").write_text("# whole file\n\nis one document\n")
    docs = list(data.iter_documents([tmp_path / "a.jsonl", tmp_path / "d", tmp_path / "plain.md"]))
    assert docs == ["one", "two", "bee", "b2", "zed\n", "# whole file\n\nis one document\n"]


@pytest.mark.parametrize("lines, words", [
    ('{"text": "ok"}\n{"txt": "no"}\n', "bad.jsonl:2"),
    ('{"text": "ok"}\n{"text": 5}\n', "bad.jsonl:2"),
    ('{"text": "ok"}\n{oops\n', "bad.jsonl:2: not JSON"),
])
def test_iter_documents_bad_jsonl_line(tmp_path, lines, words):
    (tmp_path / "bad.jsonl").write_text(lines)
    with pytest.raises(UsageError, match=words):
        list(data.iter_documents([tmp_path / "bad.jsonl"]))


def test_iter_documents_missing_inputs(tmp_path):
    with pytest.raises(UsageError, match="input not found: .*nope.jsonl"):
        list(data.iter_documents([tmp_path / "nope.jsonl"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no .txt, .jsonl or .json files"):
        list(data.iter_documents([tmp_path / "empty"]))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UsageError, match="not UTF-8"):
        list(data.iter_documents([tmp_path / "latin1.txt"]))


# ----------------------------------------------------------------------------------------------- preprocess
def test_preprocess_bytes_writes_megatron_indexed_dataset(tmp_path):
    texts = ["hello", "", "wörld\n"]  # the empty document is skipped
    write_jsonl(tmp_path / "a.jsonl", texts)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("file doc")
    out = tmp_path / "out" / "ds"
    summary = data.preprocess([tmp_path / "a.jsonl", tmp_path / "d"], "bytes", str(out))

    expected = [list(t.encode()) + [256] for t in ["hello", "wörld\n", "file doc"]]
    assert summary == {"documents": 3, "tokens": sum(map(len, expected)), "prefix": str(out),
                       "bin": f"{out}.bin", "idx": f"{out}.idx", "tokenizer": "bytes", "vocab_size": 257}
    ds = IndexedDataset(str(out))
    assert len(ds) == 3 and ds.index.dtype == np.uint16
    assert [ds[i].tolist() for i in range(3)] == expected
    assert list(ds.document_indices) == [0, 1, 2, 3]  # one sequence per document
    assert files_under(tmp_path / "out") == ["ds.bin", "ds.idx"]


def test_preprocess_with_workers_is_identical(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", toy_texts(200))
    data.preprocess([corpus], "bytes", str(tmp_path / "one"))
    data.preprocess([corpus], "bytes", str(tmp_path / "two"), workers=2)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()


def test_preprocess_trains_tokenizer(tmp_path):
    texts = toy_texts(300)
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    summary = data.preprocess([corpus], None, str(tmp_path / "ds"), train_tokenizer_vocab=300)
    model = str(tmp_path / "ds.tokenizer.model")
    assert summary["tokenizer"] == model and summary["vocab_size"] == 300 and summary["documents"] == 300
    tok = data.load_tokenizer(model)
    ds = IndexedDataset(str(tmp_path / "ds"))
    assert ds[0].tolist() == [1] + tok.encode(texts[0]) + [2]  # LLaMA-like: bos (1) starts, eos (2) ends a document
    assert sum(len(ds[i]) for i in range(len(ds))) == summary["tokens"] < sum(map(len, texts))


@pytest.mark.parametrize("style", ["llama3", "qwen2"])
def test_preprocess_with_hf_tokenizer(tmp_path, style):
    texts = toy_texts(40)
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    path = tokenizer_dir(tmp_path / "tok", style)
    tok = data.load_tokenizer(path)
    summary = data.preprocess([corpus], str(path), str(tmp_path / "one"))
    assert summary["tokenizer"] == str(path) and summary["vocab_size"] == 300
    ds = IndexedDataset(str(tmp_path / "one"))
    bos = [tok.bos] if tok.bos is not None else []  # Llama-3 starts each document with <|begin_of_text|>
    assert [ds[i].tolist() for i in range(len(ds))] == [bos + tok.encode(t) + [tok.eod] for t in texts]
    data.preprocess([corpus], str(path), str(tmp_path / "two"), workers=2)  # workers load it from its spec
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()


def test_preprocess_failure_leaves_old_outputs_and_no_temp_files(tmp_path):
    data.preprocess([write_jsonl(tmp_path / "good.jsonl", ["old"])], "bytes", str(tmp_path / "ds"))
    before = {p: (tmp_path / p).read_bytes() for p in ("ds.bin", "ds.idx")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "new"}\n' * 50 + '{"no_text": 1}\n')
    for workers in (1, 2):
        with pytest.raises(UsageError, match="bad.jsonl:51"):
            data.preprocess([bad], "bytes", str(tmp_path / "ds"), workers=workers)
        assert files_under(tmp_path) == ["bad.jsonl", "ds.bin", "ds.idx", "good.jsonl"]
        assert {p: (tmp_path / p).read_bytes() for p in before} == before
    with pytest.raises(UsageError, match="no text"):
        data.preprocess([write_jsonl(tmp_path / "empty.jsonl", ["", ""])], "bytes", str(tmp_path / "e"))
    with pytest.raises(UsageError, match="not both"):
        data.preprocess([bad], "bytes", str(tmp_path / "e"), train_tokenizer_vocab=300)
    assert not any(name.startswith("e.") for name in files_under(tmp_path))


# ----------------------------------------------------------------------------------------------- GPTDataset
@pytest.fixture
def two_prefixes(tmp_path):
    """Two byte-level datasets that can be told apart by their letters: all 'a...' and all 'b...'."""
    a = data.preprocess([write_jsonl(tmp_path / "a.jsonl", ["a" * n for n in range(50, 90)])], "bytes",
                        str(tmp_path / "a"))
    b = data.preprocess([write_jsonl(tmp_path / "b.jsonl", ["b" * n for n in range(50, 90)])], "bytes",
                        str(tmp_path / "b"))
    return a["prefix"], b["prefix"]


def test_build_gpt_dataset_samples(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", toy_texts(100))
    prefix = data.preprocess([corpus], "bytes", str(tmp_path / "ds"))["prefix"]
    tok = data.load_tokenizer("bytes")
    ds = data.build_gpt_dataset(prefix, 64, 40, 1234, tok, cache_dir=str(tmp_path / "cache"))
    assert type(ds).__name__ == "GPTDataset" and len(ds) >= 40  # megatron builds whole epochs
    for i in (0, 1, 39):
        sample = ds[i]
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert all(v.shape == (64,) for v in sample.values())
        assert sample["labels"][:-1].tolist() == sample["tokens"][1:].tolist()
        assert sample["position_ids"].tolist() == list(range(64))
        assert sample["loss_mask"].sum() == 64
        assert int(sample["tokens"].max()) <= 256
    assert any(name.endswith("GPTDataset-train-shuffle_index.npy") for name in os.listdir(tmp_path / "cache"))

    again = data.build_gpt_dataset(prefix, 64, 40, 1234, "bytes", cache_dir=str(tmp_path / "cache"))
    other = data.build_gpt_dataset(prefix, 64, 40, 99, "bytes", cache_dir=str(tmp_path / "cache"))
    assert all(ds[i]["tokens"].tolist() == again[i]["tokens"].tolist() for i in range(40))
    assert any(ds[i]["tokens"].tolist() != other[i]["tokens"].tolist() for i in range(40))


def test_document_options_restart_positions_and_drop_the_loss_across_boundaries(tmp_path):
    """megatron's reset_position_ids and eod_mask_loss through build_gpt_dataset: positions restart right after
    each EOD (where packing.document_bounds puts a document's start), and the loss is dropped exactly where the
    input token is EOD (the prediction of the next document's first token); reset_attention_mask builds no mask."""
    from megarope.packing import document_bounds

    corpus = write_jsonl(tmp_path / "c.jsonl", ["x" * n for n in (20, 33, 9, 41, 27, 15, 38)] * 3)
    prefix = data.preprocess([corpus], "bytes", str(tmp_path / "ds"))["prefix"]
    options = dict(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    ds = data.build_gpt_dataset(prefix, 64, 8, 5, "bytes", cache_dir=str(tmp_path / "cache"), **options)
    plain = data.build_gpt_dataset(prefix, 64, 8, 5, "bytes", cache_dir=str(tmp_path / "cache"))
    for i in range(8):
        sample, tokens = ds[i], ds[i]["tokens"]
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}  # no attention mask
        assert tokens.tolist() == plain[i]["tokens"].tolist()
        bounds = document_bounds(tokens, 256)
        assert len(bounds) > 2  # documents of 10 to 42 tokens in 64
        restarted = [p for start, end in zip(bounds, bounds[1:]) for p in range(end - start)]
        assert sample["position_ids"].tolist() == restarted
        assert sample["loss_mask"].tolist() == [0.0 if t == 256 else 1.0 for t in tokens.tolist()]
        assert plain[i]["position_ids"].tolist() == list(range(64)) and plain[i]["loss_mask"].sum() == 64


def test_build_gpt_dataset_default_cache_beside_data(two_prefixes, tmp_path):
    ds = data.build_gpt_dataset(two_prefixes[0], 16, 10, 0, "bytes", split_name="valid")
    assert len(ds) >= 10 and ds[0]["tokens"].shape == (16,)
    assert any("GPTDataset-valid" in name for name in os.listdir(tmp_path / ".cache"))


def test_blend_follows_weights(two_prefixes, tmp_path):
    a, b = two_prefixes
    ds = data.build_gpt_dataset([(a, 3.0), (b, 1.0)], 32, 400, 7, "bytes", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 400
    from_a = 0
    for i in range(len(ds)):
        letters = set(ds[i]["tokens"].tolist()) - {256}
        assert letters in ({ord("a")}, {ord("b")})  # each sample comes from one dataset
        from_a += letters == {ord("a")}
    assert from_a / len(ds) == pytest.approx(0.75, abs=0.02)


def test_build_gpt_dataset_bad_inputs(two_prefixes, tmp_path):
    a, _ = two_prefixes
    with pytest.raises(UsageError, match="prefix .*nowhere"):
        data.build_gpt_dataset([a, str(tmp_path / "nowhere")], 32, 10, 0, "bytes")
    with pytest.raises(UsageError, match="positive"):
        data.build_gpt_dataset([(a, 1.0), (a, 0.0)], 32, 10, 0, "bytes")
    with pytest.raises(UsageError, match="split"):
        data.build_gpt_dataset(a, 32, 10, 0, "bytes", split_name="dev")


def _build_on_two_ranks(prefix, root):
    """Each rank's outcome of three builds: rank 0 slow to write the index cache, a cache directory that is
    another one on each rank (as a node-local one is on each node), and one that rank 0 cannot write."""
    import time

    import torch.distributed as dist

    from distributed import start_with_short_default_timeout
    from megarope import parallel

    start_with_short_default_timeout(5)
    parallel.init()
    rank, out = dist.get_rank(), {}
    save = np.save

    def slow_save(*args, **kwargs):  # rank 0 writes the indices for longer than the default group waits
        time.sleep(8)
        return save(*args, **kwargs)

    np.save = slow_save if rank == 0 else save
    ds = data.build_gpt_dataset(prefix, 64, 40, 1234, "bytes", cache_dir=os.path.join(root, "shared"))
    np.save = save
    out["samples"] = [ds[i]["tokens"].tolist() for i in (0, 17, 39)]
    for name, cache_dir in (("node_local", os.path.join(root, f"rank{rank}")),
                            ("unwritable", os.path.join(root, "a_file", "cache"))):
        try:
            data.build_gpt_dataset(prefix, 64, 40, 1234, "bytes", cache_dir=cache_dir)
            out[name] = "built"
        except (UsageError, RuntimeError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


@pytest.mark.slow
def test_under_torch_distributed_rank_0_builds_first_and_every_rank_must_see_its_cache(tmp_path):
    """megatron builds the indices on rank 0 while the others wait in a barrier of the default group (NCCL's
    on GPUs, with its 10-minute watchdog), and then the others read rank 0's cache: a rank that cannot see it
    failed with FileNotFoundError, and a failure on rank 0 left the others waiting. Now rank 0 builds first
    while the others wait on the host-side group, a cache rank 1 cannot see is one line on every rank, and
    so is a cache rank 0 cannot write."""
    from distributed import run_distributed

    prefix = data.preprocess([write_jsonl(tmp_path / "c.jsonl", toy_texts(100))], "bytes", str(tmp_path / "ds"))["prefix"]
    (tmp_path / "a_file").write_text("not a directory")
    results = run_distributed(_build_on_two_ranks, 2, prefix, str(tmp_path), timeout=300)
    alone = data.build_gpt_dataset(prefix, 64, 40, 1234, "bytes", cache_dir=str(tmp_path / "alone"))
    assert results[0]["samples"] == results[1]["samples"] == [alone[i]["tokens"].tolist() for i in (0, 17, 39)]
    assert results[1]["node_local"].startswith(f"UsageError: rank 1 (on {socket.gethostname()}) does not see the "
                                               f"dataset indices rank 0 wrote to {tmp_path / 'rank1'}")
    assert "set data.cache_dir to one" in results[1]["node_local"]
    assert results[0]["node_local"] == "UsageError: another rank stopped on bad input (see its message)"
    assert results[0]["unwritable"].startswith(f"UsageError: cannot write megatron's dataset index cache to "
                                               f"{tmp_path / 'a_file' / 'cache'}")
    assert results[1]["unwritable"] == "UsageError: another rank stopped on bad input (see its message)"


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_preprocess(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["abc", "de"])
    assert main(["preprocess", "--input", str(corpus), "--tokenizer", "bytes",
                 "--output-prefix", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "2 documents, 7 tokens" in out and str(tmp_path / "ds.bin") in out
    ds = IndexedDataset(str(tmp_path / "ds"))  # keep it alive: its arrays are views of an mmap it closes on del
    assert ds[1].tolist() == [100, 101, 256]


@pytest.mark.parametrize("args, words", [
    (["--input", "{d}/missing.jsonl", "--tokenizer", "bytes"], "input not found"),
    (["--input", "{d}/c.jsonl", "--tokenizer", "{d}/missing.model"], "tokenizer not found"),
    (["--input", "{d}/c.jsonl"], "exactly one of --tokenizer and --train-tokenizer"),
    (["--input", "{d}/c.jsonl", "--tokenizer", "bytes", "--train-tokenizer", "300"], "exactly one"),
    (["--input", "{d}/c.jsonl", "--tokenizer", "bytes", "--workers", "0"], "must be positive"),
])
def test_cli_preprocess_bad_input(tmp_path, capsys, args, words):
    write_jsonl(tmp_path / "c.jsonl", ["abc"])
    argv = ["preprocess", *[a.format(d=tmp_path) for a in args], "--output-prefix", str(tmp_path / "ds")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err
    assert files_under(tmp_path) == ["c.jsonl"]


def test_cli_preprocess_bad_line_in_a_fresh_process(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    r = subprocess.run([sys.executable, "-m", "megarope", "preprocess", "--input", str(tmp_path / "c.jsonl"),
                        "--tokenizer", "bytes", "--output-prefix", str(tmp_path / "ds")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "c.jsonl:2" in r.stderr  # megatron's import noise is silenced
    assert files_under(tmp_path) == ["c.jsonl"]


# ----------------------------------------------------------------------------------------------- corpora
def test_stdlib_corpus_is_deterministic_and_idempotent(tmp_path):
    train, eval_ = data.stdlib_corpus(tmp_path / "one")
    evals = [json.loads(line) for line in open(eval_)]
    trains = [json.loads(line) for line in open(train)]
    assert len(evals) == 20 and all(len(d["text"].encode()) >= 8192 for d in evals)
    assert len(trains) > 200
    paths = [d["path"] for d in trains + evals]
    assert len(set(paths)) == len(paths) and not any("site-packages" in p for p in paths)
    assert [d["path"] for d in trains] == sorted(d["path"] for d in trains)

    again = data.stdlib_corpus(tmp_path / "two")
    assert [open(p, "rb").read() for p in again] == [open(p, "rb").read() for p in (train, eval_)]

    os.utime(train, (0, 0))
    assert data.stdlib_corpus(tmp_path / "one", n_eval_files=3) == (train, eval_)  # present: not rewritten
    assert os.stat(train).st_mtime == 0


def test_stdlib_corpus_selection_rules(tmp_path):
    src = tmp_path / "lib"
    for i in range(12):
        (src / "pkg").mkdir(parents=True, exist_ok=True)
        (src / "pkg" / f"m{i:02}.py").write_text(f"# module {i}\n" + "x = 1\n" * (50 * i))
    for skipped in ("site-packages", "test", "pkg/tests"):
        (src / skipped).mkdir(parents=True, exist_ok=True)
        (src / skipped / "big.py").write_text("y = 2\n" * 1000)
    (src / "latin.py").write_bytes("# coding: latin-1\ns = 'café'\n".encode("latin-1"))
    (src / "notes.txt").write_text("not python")

    train, eval_ = data.stdlib_corpus(tmp_path / "out", n_eval_files=3, min_eval_bytes=1500, source_dir=src)
    eval_paths = [json.loads(line)["path"] for line in open(eval_)]
    train_paths = [json.loads(line)["path"] for line in open(train)]
    big = [f"pkg/m{i:02}.py" for i in range(5, 12)]  # m05.py and up have >= 1500 bytes
    assert eval_paths == big[1::2][:3] == ["pkg/m06.py", "pkg/m08.py", "pkg/m10.py"]
    assert sorted(train_paths + eval_paths) == [f"pkg/m{i:02}.py" for i in range(12)]
    assert files_under(tmp_path / "out") == ["eval.jsonl", "train.jsonl"]

    with pytest.raises(UsageError, match="only 7 .py files"):
        data.stdlib_corpus(tmp_path / "out2", n_eval_files=8, min_eval_bytes=1500, source_dir=src)
    assert not (tmp_path / "out2").exists()


def test_prepare_toy_data_is_idempotent(tmp_path):
    prefix = data.prepare_toy_data(tmp_path)
    assert prefix == str(tmp_path / "train")
    ds = IndexedDataset(prefix)
    n_train = sum(1 for _ in open(tmp_path / "train.jsonl"))
    assert len(ds) == n_train and all(ds[i][-1] == 256 for i in (0, len(ds) - 1))
    os.utime(prefix + ".bin", (0, 0))
    assert data.prepare_toy_data(tmp_path) == prefix and os.stat(prefix + ".bin").st_mtime == 0


def _small_stdlib(root):
    """A standard library in miniature: 20 modules of 300 bytes, pydoc's topics, IDLE's help page, a text file,
    and what the corpora leave out (tests, site-packages, an empty file)."""
    for i in range(20):
        (root / "pkg").mkdir(parents=True, exist_ok=True)
        (root / "pkg" / f"m{i:02}.py").write_text(f"# module {i}\n" + "x = 1\n" * 48)
    (root / "pydoc_data").mkdir()
    (root / "pydoc_data" / "topics.py").write_text(
        "# Autogenerated\ntopics = {'assert': 'The \"assert\" statement\\n'\n           'asserts.\\n', "
        "'if': 'The \"if\" statement'}\n")
    (root / "idlelib").mkdir()
    (root / "idlelib" / "help.html").write_text(
        "<html><head><style>p {color: red}</style><script>var x;</script></head>\n<body>\n\n\n<h1>IDLE</h1>\n"
        "   <p>Help text</p>\n</body></html>")
    (root / "LICENSE.txt").write_text("A license.\n")
    (root / "empty.py").write_text("")
    for skipped in ("test", "site-packages"):
        (root / skipped).mkdir()
        (root / skipped / "big.py").write_text("y = 2\n" * 1000)
        (root / skipped / "README.txt").write_text("left out")
    return root


def test_stdlib_documentation_is_the_text_the_library_ships(tmp_path):
    docs = data.stdlib_documentation(_small_stdlib(tmp_path / "lib"))
    assert docs == {"pydoc_data/topics.py:assert": 'The "assert" statement\nasserts.\n',
                    "pydoc_data/topics.py:if": 'The "if" statement', "idlelib/help.html": "IDLE\nHelp text",
                    "LICENSE.txt": "A license.\n"}
    real = data.stdlib_documentation()  # this Python's: pydoc's topics, IDLE's help and NEWS, the license
    assert len([k for k in real if k.startswith("pydoc_data/topics.py:")]) > 50
    assert {"idlelib/help.html", "LICENSE.txt"} <= set(real) and "<" not in real["idlelib/help.html"][:200]


def test_stdlib_long_corpus_holds_out_whole_files_joined_to_the_lengths_asked_for(tmp_path):
    src = _small_stdlib(tmp_path / "lib")
    prefix, paths = data.stdlib_long_corpus(tmp_path / "out", "bytes", [(1000, 2), (600, 1)], source_dir=src)
    assert set(paths) == {(1000, 2), (600, 1)} and os.path.dirname(prefix) == os.path.dirname(paths[(600, 1)])
    docs = {key: [json.loads(line) for line in open(path)] for key, path in paths.items()}
    assert [len(d) for d in (docs[(1000, 2)], docs[(600, 1)])] == [2, 1]
    held = set()
    for key, found in docs.items():
        for doc in found:
            assert len(doc["text"].encode()) >= key[0]  # byte tokens: bytes are tokens
            assert doc["text"].startswith(f"# file: {doc['files'][0]}\n# module")
            assert all(f"# file: {f}\n" in doc["text"] for f in doc["files"])
            held.update(doc["files"])
    assert held <= {f"pkg/m{i:02}.py" for i in range(20)} and len(held) == 8  # 2 x 1,000 bytes of 313-byte pieces
    train = [json.loads(line)["path"] for line in open(os.path.join(os.path.dirname(prefix), "train.jsonl"))]
    modules = {f"pkg/m{i:02}.py" for i in range(20)}
    assert set(train) & modules == modules - held  # every module not held out, and no held-out one
    assert {"pydoc_data/topics.py:assert", "idlelib/help.html", "LICENSE.txt"} <= set(train)
    assert "pydoc_data/topics.py" not in train and not any(p.startswith(("test/", "site-packages/")) for p in train)
    assert len(IndexedDataset(prefix)) == len(train)
    os.utime(prefix + ".bin", (0, 0))
    assert data.stdlib_long_corpus(tmp_path / "out", "bytes", [(600, 1), (1000, 2)], source_dir=src) == (prefix, paths)
    assert os.stat(prefix + ".bin").st_mtime == 0  # reused, not rewritten

    with pytest.raises(UsageError, match=r"too short for 3 evaluation document\(s\) of 1,000 tokens"):
        data.stdlib_long_corpus(tmp_path / "out2", "bytes", [(1000, 3)], source_dir=src)
    assert not (tmp_path / "out2").exists()  # refused before anything is written
