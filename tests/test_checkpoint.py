"""Loading model checkpoints: across backends (only `_extra_state` may differ), any other mismatch is
one line, and Transformer Engine's pickled FP8 state is allowed only while megarope loads its own."""

import os

import pytest
import torch

from megarope import checkpoint, parallel, spec
from megarope.errors import UsageError
from megarope.model import build_model, get_preset
from megarope.rope import RopeConfig


class NormWithExtraState(spec.RMSNorm):
    """The local RMSNorm with the `_extra_state` Transformer Engine's norms carry (its FP8 metadata,
    a byte tensor); records what set_extra_state got and whether TE's unpickling was allowed then."""

    loaded: list = []

    def get_extra_state(self):
        return torch.tensor([1, 2, 3], dtype=torch.uint8)

    def set_extra_state(self, state):
        NormWithExtraState.loaded.append((state, os.environ.get(checkpoint.UNSAFE_PICKLE_ENV)))


def _model(seed: int, extra_state: bool = False, extra_param: bool = False):
    parallel.seed_everything(seed)
    model = build_model(get_preset("toy"), RopeConfig(), "local")
    norm = model.decoder.final_layernorm
    if extra_state:
        norm.__class__ = NormWithExtraState  # a "te-like" model: one module more with extra state
    if extra_param:
        norm.register_parameter("bias", torch.nn.Parameter(torch.zeros_like(norm.weight)))
    return model


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor) and k in sb)


@pytest.fixture
def world():
    parallel.init()
    NormWithExtraState.loaded.clear()
    yield


def test_a_checkpoint_without_extra_state_loads_into_a_model_with_it(world, tmp_path):
    source = _model(1)
    checkpoint.save_model(source, str(tmp_path / "local"))
    target = _model(2, extra_state=True)
    assert not _same_weights(source, target)
    checkpoint.load_model(target, str(tmp_path / "local"))
    assert _same_weights(source, target)
    assert NormWithExtraState.loaded == []  # nothing to give it


def test_a_checkpoint_with_extra_state_loads_into_a_model_without_it(world, tmp_path):
    source = _model(1, extra_state=True)
    checkpoint.save_model(source, str(tmp_path / "te-like"))
    target = _model(2)
    checkpoint.load_model(target, str(tmp_path / "te-like"))
    assert _same_weights(source, target)
    # and back into a model that has it: the state arrives, with TE's unpickling allowed during the load only
    again = _model(3, extra_state=True)
    checkpoint.load_model(again, str(tmp_path / "te-like"))
    assert _same_weights(source, again)
    [(state, allowed)] = NormWithExtraState.loaded
    assert torch.equal(state, torch.tensor([1, 2, 3], dtype=torch.uint8)) and allowed == "1"
    assert checkpoint.UNSAFE_PICKLE_ENV not in os.environ


@pytest.mark.parametrize("saved_has_it", [True, False], ids=["only-in-checkpoint", "only-in-model"])
def test_any_other_key_that_one_side_lacks_is_one_line(world, tmp_path, saved_has_it):
    checkpoint.save_model(_model(1, extra_param=saved_has_it), str(tmp_path / "ck"))
    with pytest.raises(UsageError) as error:
        checkpoint.load_model(_model(2, extra_param=not saved_has_it), str(tmp_path / "ck"))
    message = str(error.value)
    assert "\n" not in message and "decoder.final_layernorm.bias" in message
    assert ("not in the model" if saved_has_it else "not in the checkpoint") in message
    assert checkpoint.UNSAFE_PICKLE_ENV not in os.environ


@pytest.mark.parametrize("before", [None, "0"])
def test_unsafe_pickle_is_allowed_only_inside_and_restored_after(monkeypatch, before):
    if before is None:
        monkeypatch.delenv(checkpoint.UNSAFE_PICKLE_ENV, raising=False)
    else:
        monkeypatch.setenv(checkpoint.UNSAFE_PICKLE_ENV, before)
    with pytest.raises(RuntimeError), checkpoint.trusted_extra_state():
        assert os.environ[checkpoint.UNSAFE_PICKLE_ENV] == "1"
        raise RuntimeError("a failed load restores it too")
    assert os.environ.get(checkpoint.UNSAFE_PICKLE_ENV) == before
