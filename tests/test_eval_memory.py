"""The per-rank memory estimate (linear in length, what CP and the K/V passing change) and --max-memory:
what fits passes, what does not is refused in one line that says what would fit, before anything loads."""

import json
import shutil
import subprocess

import pytest
from eval_helpers import CLI, REPO, save_toy_checkpoint

from megarope.errors import UsageError
from megarope.eval.memory import GB, check_max_memory, estimate_eval_memory
from megarope.model import get_preset

ONE_B = get_preset("llama-1b")


def test_memory_estimate():
    est = estimate_eval_memory(ONE_B, 2**20, 2)
    assert 20e9 < est["peak"] < 0.8 * 80e9  # 1M tokens fit one 80 GB GPU with room to spare
    assert est["weights"] == pytest.approx(2.2e9, rel=0.05)
    unchunked = estimate_eval_memory(ONE_B, 2**20, 2, mlp_chunk=None)
    assert unchunked["mlp"] > 50e9 > est["mlp"]  # why score_sequences chunks the MLP
    for length in (2**14, 2**17, 2**20):  # linear in length: activations dominate, nothing is quadratic
        for cp, comm in ((1, "auto"), (2, "all-gather"), (8, "ring")):
            a = estimate_eval_memory(ONE_B, length, 2, cp=cp, cp_comm=comm)
            b = estimate_eval_memory(ONE_B, 2 * length, 2, cp=cp, cp_comm=comm)
            assert b["peak"] <= 2.05 * a["peak"]
    assert estimate_eval_memory(ONE_B, 2**20, 2, cp=8)["peak"] < est["peak"] / 2.5
    # the all-gather holds every rank's K/V, the ring two ranks' worth: the gap grows with CP
    gather = estimate_eval_memory(ONE_B, 2**22, 2, cp=16, cp_comm="all-gather")["attention"]
    ring = estimate_eval_memory(ONE_B, 2**22, 2, cp=16, cp_comm="ring")["attention"]
    assert gather - ring == pytest.approx(2**22 / 16 * 2 * (16 - 1) * 2 * 256, rel=1e-6)
    # batched short sequences count as the tokens they add up to
    assert estimate_eval_memory(ONE_B, 1024, 2, sequences=16)["mlp"] == estimate_eval_memory(ONE_B, 16384, 2)["mlp"]


def test_max_memory_passes_what_fits_and_picks_the_ring_where_only_it_fits():
    assert check_max_memory({"1b": ONE_B}, [2**16, 2**20], 80, 2) == "auto"
    assert check_max_memory({"1b": ONE_B}, [2**20], 40, 2, cp=2, cp_comm="ring") == "ring"
    peak = {comm: estimate_eval_memory(ONE_B, 2**22, 2, cp=8, cp_comm=comm)["peak"] / GB
            for comm in ("all-gather", "ring")}
    between = (peak["all-gather"] + peak["ring"]) / 2
    assert check_max_memory({"1b": ONE_B}, [2**22], between, 2, cp=8) == "ring"
    with pytest.raises(UsageError):  # asked for the all-gather, which does not fit
        check_max_memory({"1b": ONE_B}, [2**22], between, 2, cp=8, cp_comm="all-gather")


def test_max_memory_refusal_says_what_fits():
    with pytest.raises(UsageError) as e:
        check_max_memory({"1b": ONE_B}, [2**16, 2**20], 20, 2)
    message = str(e.value)
    assert "\n" not in message and "1b at 1M tokens needs an estimated 38.5 GB per rank" in message
    assert "the longest length that fits at CP 1 is" in message and "CP 4 fits 1M" in message
    longest = int(message.split("fits at CP 1 is ")[1].split("K")[0]) * 1024
    assert estimate_eval_memory(ONE_B, longest, 2)["peak"] <= 20 * GB < \
        estimate_eval_memory(ONE_B, longest + 1024, 2)["peak"]
    # CP 3 cannot split 1M into 6 equal chunks; CP 2 does not fit
    assert estimate_eval_memory(ONE_B, 2**20, 2, cp=2)["peak"] > 20 * GB >= estimate_eval_memory(ONE_B, 2**20, 2,
                                                                                                  cp=4)["peak"]
    with pytest.raises(UsageError, match="must be positive"):
        check_max_memory({"1b": ONE_B}, [2**20], 0, 2)


def test_max_memory_counts_the_window_not_the_length():
    """A sliding window scores W-token windows, so a length far beyond what fits whole still fits."""
    with pytest.raises(UsageError):
        check_max_memory({"1b": ONE_B}, [2**22], 40, 2)
    assert check_max_memory({"1b": ONE_B}, [2**22], 40, 2, window=2**16) == "auto"


def test_cli_max_memory_refuses_before_loading_anything(tmp_path):
    """A checkpoint without its weights: the refusal comes first, in one line, exit code 2."""
    ckpt = save_toy_checkpoint(tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / "model")  # loading it would fail loudly
    (tmp_path / "doc.txt").write_text("x" * 70000)
    for command, out in (("eval", ["--data", str(tmp_path / "doc.txt")]), ("passkey", [])):
        r = subprocess.run([*CLI, command, "--checkpoint", ckpt, "--lengths", "1K,64K", "--max-memory", "0.2",
                            "--out", str(tmp_path / command), *out], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert "ckpt at 64K tokens needs an estimated 0.4 GB per rank" in lines[0], lines[0]
        assert "over --max-memory 0.2 GB: the longest length that fits at CP 1 is 20K; CP 4 fits 64K" in lines[0]
        assert not (tmp_path / command).exists()
    ok = subprocess.run([*CLI, "eval", "--checkpoint", save_toy_checkpoint(tmp_path / "whole"), "--data",
                         str(tmp_path / "doc.txt"), "--lengths", "1K", "--max-memory", "1", "--out",
                         str(tmp_path / "ok")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads((tmp_path / "ok" / "results.json").read_text())) == 1


def test_a_7b_model_scores_512k_tokens_on_one_80_gb_gpu():
    """llama2-7b at 512K: the MLP runs in chunks, so no [S x ffn] tensor is whole; what stays whole per layer is
    the QKV projection's output, q and k after RoPE and the attention's output (the attention reads all of K/V)."""
    seven_b, length = get_preset("llama2-7b"), 2**19
    est = estimate_eval_memory(seven_b, length, 2)
    assert est["peak"] < 0.8 * 80e9 and max(est, key=lambda k: est[k] if k != "peak" else 0) == "attention"
    whole = estimate_eval_memory(seven_b, length, 2, mlp_chunk=None)["mlp"]  # fc1's [S x 2 ffn] and the rest
    assert whole > 5 * length * seven_b.ffn_hidden_size * 2 > 3 * est["mlp"]
    assert check_max_memory({"7b": seven_b}, [length], 80, 2) == "auto"
