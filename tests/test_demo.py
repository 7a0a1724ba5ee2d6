"""A seconds-scale run of the demo's whole pipeline (the real demo is `make demo`, not a test)."""

import json
import os

import pytest

from megarope import demo


def test_predicted_bounds_for_the_toy_model():
    assert demo.predicted_bound(1e6) == pytest.approx(1117, abs=1)  # above beta_0: eq. (16b)
    assert demo.predicted_bound(1e4) == 128  # at most beta_0: the tuning length
    assert demo.predicted_bound(10.0) is None  # below beta_3 = 20.4: no hard bound


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, capsys):
    tiny = demo.Budget(pretrain_steps=6, tune_steps=3, eval_docs=2)
    summary = demo.run(str(tmp_path), budget=tiny, eval_len=1024)
    assert [s["base"] for s in summary] == list(demo.BASES)
    assert {tuple(sorted(s)) for s in summary} == {("base", "measured_break", "predicted_bound")}
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    records = json.loads((tmp_path / "results.json").read_text())
    assert len(records) == 12 and all({"run", "length", "loss", "ppl", "accuracy", "n_docs"} <= set(r) for r in records)
    assert [r["length"] for r in records] == [128, 256, 512, 1024] * 3 and all(r["n_docs"] == 2 for r in records)
    assert os.path.getsize(tmp_path / "ppl_vs_length.png") > 1000
    out = capsys.readouterr().out
    assert "predicted bound" in out and "measured break" in out

    demo.run(str(tmp_path), budget=tiny, eval_len=1024)  # a rerun trains nothing
    assert capsys.readouterr().out.count("cached") == 4
