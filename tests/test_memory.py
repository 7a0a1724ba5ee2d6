"""Training memory on paper: parameter counts against published ones and a built model, the estimate's parts."""

import pytest

from megarope import memory, parallel
from megarope.model import build_model, count_parameters, get_preset
from megarope.rope import RopeConfig


@pytest.mark.parametrize("name, published", [("llama2-7b", 6_738_415_616), ("llama2-70b", 68_976_648_192)])
def test_parameters_are_the_published_counts(name, published):
    assert memory.model_parameters(get_preset(name)) == published


def test_one_stage_is_the_built_model():
    parallel.init()
    model = build_model(get_preset("toy"), RopeConfig(base=1e4, train_len=128))
    assert memory.stage_parameters(get_preset("toy"), tp=1, pp=1) == [count_parameters(model)]


def test_stages_split_the_layers_and_hold_embedding_and_output_at_the_ends():
    p = get_preset("llama2-70b")
    stages = memory.stage_parameters(p, tp=8, pp=4)
    vocab = p.padded_vocab_size * p.hidden_size // 8
    assert stages[1] == stages[2] == 20 * memory.layer_parameters(p, 8)
    assert stages[0] == stages[1] + vocab and stages[3] == stages[1] + vocab + p.hidden_size
    assert sum(stages) == pytest.approx(memory.model_parameters(p) / 8, rel=1e-3)  # norms replicate over TP


def test_the_estimate_adds_up():
    p = get_preset("llama2-70b")
    m = memory.estimate_training_memory(p, tp=8, cp=2, pp=4, dp=2, seq_len=16384, micro_batch=1, num_micro=64,
                                        dtype="bf16")
    assert m.parameters == max(memory.stage_parameters(p, 8, 4))
    assert (m.weights, m.gradients, m.optimizer) == (2 * m.parameters, 4 * m.parameters, 12 * m.parameters / 4)
    assert m.in_flight == 4  # 1F1B: the first stage holds PP micro batches
    per_layer = memory.layer_activation_bytes(p, 8192, 8, 2, recompute=False)
    assert m.activations == 4 * 20 * per_layer
    assert m.activations_recompute == 4 * 20 * 8192 * 8192 * 2 // 8 + per_layer
    assert m.total(True) < m.total(False)
    assert m.total(False) == m.weights + m.gradients + m.optimizer + m.activations + m.workspace + m.loss_chunked
    # the last stage's logits: 8192 tokens per CP rank x 4000 vocabulary rows per TP rank, bf16 + the fp32 buffer
    assert m.loss_full == 8192 * 4000 * (2 + 4) and m.loss_chunked == 4096 * 4000 * (2 + 4)
    assert m.total(False, full_logits=True) - m.total(False) == m.loss_full - m.loss_chunked
    fp32 = memory.estimate_training_memory(p, tp=8, cp=2, pp=4, dp=2, seq_len=16384, micro_batch=1, num_micro=2,
                                           dtype="fp32")
    assert fp32.optimizer == 8 * fp32.parameters / 4 and fp32.in_flight == 2  # no separate masters; 2 micro batches


def test_the_loss_takes_full_logits_where_they_fit_and_chunks_where_they_do_not():
    p = get_preset("llama-1b")
    m = memory.estimate_training_memory(p, tp=1, cp=1, pp=1, dp=1, seq_len=131072, micro_batch=1, num_micro=1,
                                        dtype="bf16")
    assert m.loss_full == 131072 * 32000 * 6  # 25 GB of logits and cross-entropy buffer at 128K
    with_full = m.total(True, full_logits=True)
    assert memory.choose_loss(m, True, with_full)[0] is True
    full, why = memory.choose_loss(m, True, with_full - 1)
    assert full is False and f"full logits ({m.loss_full / 1e9:.1f} GB) would not fit" in why
    assert memory.choose_loss(m, True, with_full - 1, forced="full") == (True, "train.loss: full")
    assert memory.choose_loss(m, True, 1e15, forced="chunked") == (False, "train.loss: chunked")
