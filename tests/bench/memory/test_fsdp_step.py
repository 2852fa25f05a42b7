"""The FSDP2 world-of-one steps (bench/memory/fsdp_step.py, a part of `make gpu-check`) on CPU with
gloo: the sharded SDFTModel's and the plain student's steps equal the unsharded one, and a
refusal by the library is recorded as the result rather than as an error."""

import pytest

import sdft.integration
from bench.memory.fsdp_step import fsdp_step

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_sharded_step_equals_the_unsharded_step_on_cpu():
    r = fsdp_step("cpu")
    assert r["status"] == "ok", (r.get("reason"), r.get("traceback"))
    assert set(r["variants"]) == {"sdft_model", "plain"}  # the trainer's needs a GPU
    for way, v in r["variants"].items():
        assert v["status"] == "ok", (way, v.get("reason"), v.get("traceback"))
        assert v["wrapped_as"].startswith("FSDP")  # fully_shard really wrapped the model
        assert v["loss"] == pytest.approx(v["oracle_loss"], rel=1e-5)
        assert v["grad_rel_err"] <= 1e-4
    assert r["wrapped_as"] == "FSDPSDFTModel"  # the top level is the SDFTModel way's


def test_a_refusal_by_the_library_is_the_result(monkeypatch):
    real, sharded_calls = sdft.integration.causal_lm_loss, []

    def refuse_when_sharded(model, *args, **kwargs):
        if any(hasattr(p, "full_tensor") for p in model.parameters()):  # the oracle is unsharded
            sharded_calls.append(model)
            raise ValueError("the fused loss reads the whole LM head, which FSDP shards")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(sdft.integration, "causal_lm_loss", refuse_when_sharded)
    r = fsdp_step("cpu")
    assert r["status"] == "refused" and "FSDP shards" in r["reason"]
    assert [v["status"] for v in r["variants"].values()] == ["refused", "refused"]
    assert len(sharded_calls) == 2
