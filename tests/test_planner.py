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
