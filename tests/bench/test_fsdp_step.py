"""The FSDP2 world-of-one step (bench/fsdp_step.py, a part of `make gpu-check`) on CPU with
gloo: the sharded SDFTModel's step equals the unsharded one, and a refusal by the library is
recorded as the result rather than as an error."""

import pytest

import sdft.integration
from bench.fsdp_step import fsdp_step

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_sharded_step_equals_the_unsharded_step_on_cpu():
    r = fsdp_step("cpu")
    assert r["status"] == "ok", (r.get("reason"), r.get("traceback"))
    assert r["wrapped_as"].startswith("FSDP")  # fully_shard really wrapped the SDFTModel
    assert r["loss"] == pytest.approx(r["oracle_loss"], rel=1e-5)
    assert r["grad_rel_err"] <= 1e-4


def test_a_refusal_by_the_library_is_the_result(monkeypatch):
    real, calls = sdft.integration.causal_lm_loss, []

    def refuse_when_sharded(model, *args, **kwargs):
        calls.append(model)
        if len(calls) > 1:  # the first call is the unsharded oracle
            raise ValueError("the fused loss reads the whole LM head, which FSDP shards")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(sdft.integration, "causal_lm_loss", refuse_when_sharded)
    r = fsdp_step("cpu")
    assert r["status"] == "refused" and "FSDP shards" in r["reason"]
    assert len(calls) == 2
