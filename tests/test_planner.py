import json
import subprocess
import sys

import pytest

from megarope.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "megarope", *args], capture_output=True, text=True)


def test_plan_json_llama2(capsys):
    assert main(["plan", "--json", "--base", "1e6", "--base", "500", "--target-len", "131072"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["critical_dim"] == 92
    assert plan["critical_base"] == pytest.approx(10000)
    assert [round(b) for b in plan["small_base_thresholds"]] == [2608, 1304, 652]
    big, small = plan["bases"]
    assert big["regime"] == "above beta_0" and abs(big["extrapolation_bound"] - 129_000) < 1290
    assert small["regime"] == "below beta_3" and small["extrapolation_bound"] is None
    assert plan["targets"][0]["target_len"] == 131072 and plan["targets"][0]["base"] > 1e6


def test_plan_text_and_plot(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert main(["plan", "--tune-len", "16384", "--base", "500", "--base", "1e6", "--target-len", "1048576",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "d_extra = 92" in out and "none" in out and "1M" in out and "129,027" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, words", [
    (["plan", "--head-dim", "127"], "head_dim"),
    (["plan", "--base", "1"], "base"),
    (["plan", "--base", "abc"], "not a number"),
    (["plan", "--train-len", "4096", "--tune-len", "2048"], "tune_len"),
    (["plan", "--plot", "out.jpg"], ".png"),
    (["plan", "--nope"], "unrecognized"),
    (["frobnicate"], "invalid choice"),
])
def test_plan_bad_input_is_one_line_exit_2(args, words):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and words in result.stderr
    assert "Traceback" not in result.stderr


def test_plan_honours_rotary_percent(capsys):
    from megarope import planner, scaling

    quarter = planner.make_plan(128, 4096, 16384, [1e6], [], rotary_percent=0.25)
    assert quarter["rotary_dim"] == 32 and quarter["critical_dim"] == scaling.critical_dimension(32, 4096) == 24
    bound = quarter["bases"][0]["extrapolation_bound"]
    assert bound == scaling.extrapolation_bound(32, 4096, 1e6)  # 2pi * 1e6^(24/32), not 1e6^(92/128)
    assert bound > 1.3 * planner.make_plan(128, 4096, 16384, [1e6], [])["bases"][0]["extrapolation_bound"]
    assert main(["plan", "--rotary-percent", "0.5", "--base", "1e6"]) == 0
    assert "head dim 128 (rotary dim 64: rotary_percent 0.5)" in capsys.readouterr().out


def test_plan_from_an_hf_directory(tmp_path, capsys):
    """A Llama-3.1-like config.json: pretrained at 8K with base 500000, served at 128K. Flags still win."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
              "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
              "num_hidden_layers": 32, "vocab_size": 128256, "max_position_embeddings": 131072,
              "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["plan", "--from", str(tmp_path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["head_dim"], plan["train_len"], plan["tune_len"], plan["pretrain_base"]) == (128, 8192, 131072, 5e5)
    assert plan["bases"][0]["base"] == 5e5 and plan["lineage"]["sources"]["pretrain_len"] == \
        "config.json rope_scaling.original_max_position_embeddings"
    assert main(["plan", "--from", str(tmp_path), "--pretrain-base", "1e4", "--base", "1e6"]) == 0
    out = capsys.readouterr().out
    assert "lineage of" in out and "(pretraining base 10,000)" in out and "train length 8192" in out
    assert run_cli("plan", "--from", str(tmp_path / "nowhere")).returncode == 2
