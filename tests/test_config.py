"""The training config: schema, YAML + dotted overrides, unknown keys, the examples."""

import dataclasses
import glob
import os

import pytest

from megarope import config
from megarope.cli import main
from megarope.config import Config, apply_overrides, load_config, parse_value, validate
from megarope.errors import UsageError
from megarope.rope import RopeConfig

EXAMPLES = sorted(p for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "*.yaml"))
                  if not os.path.basename(p).startswith("experiment_"))  # experiment configs: test_experiment.py
REQUIRED_KEYS = ["rope.base", "parallel.tp", "parallel.cp", "parallel.pp", "parallel.vpp", "train.steps", "train.exit_at_step", "train.seq_len",
                 "train.global_batch", "train.micro_batch", "checkpoint.dir", "checkpoint.every", "data.path",
                 "init.from"]


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_and_the_required_dotted_keys_exist():
    cfg = load_config(None, ["data.path=some/prefix"])
    flat = cfg.to_dict()
    for key in REQUIRED_KEYS + ["model.preset", "model.backend", "rope.dynamic_ntk", "parallel.sequence_parallel",
                                "parallel.gpu_memory_gb",
                                "train.lr", "train.min_lr", "train.warmup_steps", "train.weight_decay",
                                "train.clip_grad", "train.seed", "train.dtype", "train.recompute", "train.fp8",
                                "train.fp8_recipe", "train.max_nan_skips", "data.tokenizer", "data.blend",
                                "checkpoint.keep", "checkpoint.on_corrupt", "log.tensorboard", "log.every"]:
        section, leaf = key.split(".")
        assert leaf in flat[section], key
    assert cfg.init.from_ is None and flat["init"] == {"from": None, "trust": False}
    # init.trust: the user's opt-in (true), or "own" for a workflow's own earlier stage (megarope.trust)
    assert [load_config(None, ["data.path=p", f"init.trust={v}"]).init.trust for v in ("true", "own")] == [True, "own"]
    with pytest.raises(UsageError, match="init.trust"):
        load_config(None, ["data.path=p", "init.trust=maybe"])
    assert (cfg.parallel.tp, cfg.parallel.cp, cfg.train.dtype, cfg.model.backend) == (1, 1, "auto", "local")
    assert (cfg.parallel.pp, cfg.parallel.vpp, cfg.parallel.gpu_memory_gb) == (1, None, 80.0)
    assert cfg.checkpoint.on_corrupt == "error"  # a damaged checkpoint stops the run unless the user says otherwise
    assert load_config(None, ["data.path=p", "checkpoint.on_corrupt=previous"]).checkpoint.on_corrupt == "previous"
    # megatron's document options, off by default as in megatron
    assert cfg.data.documents() == {"reset_position_ids": False, "reset_attention_mask": False, "eod_mask_loss": False}


def test_rope_section_has_exactly_the_fields_of_rope_config():
    assert set(config.RopeSection.model_fields) == {f.name for f in dataclasses.fields(RopeConfig)}
    cfg = load_config(None, ["data.path=p", "train.seq_len=256", "rope.dynamic_ntk=true"])
    rope = RopeConfig(**cfg.rope_config())
    assert rope.train_len == 256 and rope.dynamic_ntk  # train_len defaults to train.seq_len
    assert RopeConfig(**load_config(None, ["data.path=p", "rope.train_len=64"]).rope_config()).train_len == 64


@pytest.mark.parametrize("text, value", [("1e6", 1e6), ("5E-5", 5e-5), ("1.5e+3", 1500.0), ("2.0e-5", 2e-5),
                                         ("true", True), ("null", None), ("~", None), ("42", 42), ("abc", "abc"),
                                         ("[1, 2]", [1, 2]), ("-3", -3), (".inf", float("inf"))])
def test_values_parse_as_yaml_with_1e6_a_float(text, value):
    assert parse_value(text) == value


def test_overrides_apply_over_the_file(tmp_path):
    path = write(tmp_path, "rope: {base: 10000}\ntrain: {steps: 10, warmup_steps: 2}\ndata: {path: p}\n")
    cfg = load_config(path, ["rope.base=1e6", "train.steps=20", "parallel.cp=2", "init.from=null",
                             "train.fp8=e4m3", "log.tensorboard=false", "train.exit_at_step=5"])
    assert cfg.rope.base == 1e6 and isinstance(cfg.rope.base, float)
    assert (cfg.train.steps, cfg.parallel.cp, cfg.train.fp8, cfg.log.tensorboard, cfg.train.exit_at_step) == \
        (20, 2, "e4m3", False, 5)
    assert load_config(path, ["init.from=none"]).init.from_ is None
    assert load_config(path, ["init.from=/ckpt/llama"]).init.from_ == "/ckpt/llama"
    # 1e6 in a file is a number too (plain PyYAML would read the string "1e6")
    assert load_config(write(tmp_path, "rope: {base: 1e6}\ndata: {path: p}\n", "d.yaml")).rope.base == 1e6


def test_a_number_in_an_override_picks_an_item_of_a_list():
    raw = {"eval": {"extra": [{"name": "a", "enabled": False}, {"name": "b"}]}}
    assert apply_overrides(raw, ["eval.extra.1.enabled=true", "eval.extra.0.docs=2"])["eval"]["extra"] == \
        [{"name": "a", "enabled": False, "docs": 2}, {"name": "b", "enabled": True}]
    assert raw["eval"]["extra"][1] == {"name": "b"}  # the input is left as it was
    for bad, words in (("eval.extra.2.enabled=true", "eval.extra.2 is not an item of a list of 2"),
                       ("eval.extra.x=1", "eval.extra.x is not an item"),
                       ("eval.extra.0.name.first=1", "eval.extra.0.name is not a section")):
        with pytest.raises(UsageError, match=words):
            apply_overrides(raw, [bad])


def test_blend_is_weight_prefix_pairs():
    cfg = load_config(None, ["data.blend=[[0.7, a/b], [0.3, c]]"])
    assert cfg.data.sources() == [("a/b", 0.7), ("c", 0.3)]
    assert load_config(None, ["data.path=x"]).data.sources() == [("x", 1.0)]


@pytest.mark.parametrize("overrides, words", [
    (["data.path=p", "train.foo=1"], "unknown key 'train.foo'"),
    (["data.path=p", "nonsense.x=1"], "unknown key 'nonsense'"),
    (["data.path=p", "rope.bse=1e6"], "unknown key 'rope.bse'"),
    ([], "missing key 'data'"),
    (["data.path=p", "data.blend=[[1, q]]"], "exactly one of data.path and data.blend"),
    (["data.path=p", "train.steps=0"], "train.steps"),
    (["data.path=p", "train.steps=ten"], "train.steps"),
    (["data.path=p", "train.dtype=fp16"], "train.dtype"),
    (["data.path=p", "train.fp8=e5m2"], "train.fp8"),
    (["data.path=p", "model.backend=cuda"], "model.backend"),
    (["data.path=p", "rope.base=1"], "rope.base"),
    (["data.path=p", "parallel.tp=0"], "parallel.tp"),
    (["data.path=p", "parallel.pp=0"], "parallel.pp"),
    (["data.path=p", "parallel.vpp=2"], "parallel.vpp (2) needs parallel.pp > 1"),
    (["data.path=p", "parallel.pp=2", "parallel.vpp=1"], "parallel.vpp"),
    (["data.path=p", "train.global_batch=10", "train.micro_batch=4"], "divisible by micro_batch"),
    (["data.path=p", "train.steps=10", "train.warmup_steps=10"], "warmup_steps (10)"),
    (["data.path=p", "train.lr=1e-5", "train.min_lr=1e-4"], "min_lr"),
    (["data.path=p", "checkpoint.keep=0"], "checkpoint.keep"),
    (["data.path=p", "checkpoint.on_corrupt=skip"], "checkpoint.on_corrupt"),
    (["data.path"], "dotted.key=value"),
    (["=3"], "dotted.key=value"),
    (["data..path=3"], "dotted.key=value"),
    (["data.path=p", "train.steps=3", "train.steps.x=3"], "train.steps is not a section"),
])
def test_bad_configs_are_one_line_usage_errors(overrides, words):
    with pytest.raises(UsageError) as e:
        load_config(None, overrides)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_file_problems(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(UsageError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(UsageError, match=r"c.yaml: unknown key 'train.stepz'"):
        load_config(write(tmp_path, "train: {stepz: 3}\ndata: {path: p}\n"))
    assert load_config(write(tmp_path, ""), ["data.path=p"]).data.path == "p"  # an empty file is all defaults


def test_to_dict_round_trips():
    cfg = load_config(None, ["data.blend=[[2, a], [1, b]]", "init.from=/x", "rope.base=500", "train.fp8=hybrid"])
    again = validate(cfg.to_dict())
    assert again == cfg and isinstance(again, Config)


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_examples_are_valid(path):
    cfg = load_config(path)
    assert cfg.train.global_batch % cfg.train.micro_batch == 0
    assert cfg.train.seq_len % (2 * cfg.parallel.cp * cfg.parallel.tp) == 0
    if os.path.basename(path).startswith("llama2_7b"):
        # the paper's setup: 1K steps of 128 sequences, bf16, Transformer Engine, weights from LLaMA-2
        assert (cfg.train.steps, cfg.train.global_batch, cfg.train.dtype, cfg.model.backend) == (1000, 128, "bf16", "te")
        assert cfg.init.from_ and cfg.train.lr == 2e-5
        name = os.path.basename(path)
        assert cfg.rope.base == (500 if "base500" in name else 1e6)
        assert cfg.train.seq_len == (16384 if "16k" in name else 4096)
    if os.path.basename(path).startswith("llama2_70b"):
        assert (cfg.model.preset, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp) == ("llama2-70b", 8, 4, 2)
        assert (cfg.train.steps, cfg.train.global_batch, cfg.train.seq_len, cfg.rope.base) == (1000, 128, 16384, 1e6)


def test_examples_cover_the_paper_settings():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"toy_cpu.yaml", "llama2_7b_base500_16k.yaml", "llama2_7b_base1e6_4k.yaml",
            "llama2_7b_base1e6_16k.yaml", "llama2_70b_base1e6_16k.yaml"} <= names


def test_cli_train_unknown_key_is_one_line_exit_2(tmp_path, capsys):
    path = write(tmp_path, "data: {path: p}\ntrain: {steps: 3, warmup_steps: 0}\ncheckpoint: {dir: %s}\n"
                 % (tmp_path / "ck"))
    assert main(["train", path, "train.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'train.bogus'" in err
    assert not (tmp_path / "ck").exists()


def test_rope_section_takes_yarn():
    cfg = load_config(None, ["data.path=p", "rope.yarn.factor=4", "rope.yarn.original_len=4096"])
    rope = RopeConfig(**cfg.rope_config())
    assert rope.yarn.factor == 4.0 and rope.yarn.original_len == 4096 and rope.yarn.beta_fast == 32.0
    assert set(config.YarnSection.model_fields) == {f.name for f in dataclasses.fields(type(rope.yarn))}
