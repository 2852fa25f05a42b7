"""The chunk buffers kept between CPU calls (sdft_kernels/workspace.py).

Reusing storage across calls is only safe if nothing a call returns or saves for its backward
lives in it, if a call of another shape, dtype or thread never sees another's values, and if
storage made under inference mode is not written outside it: each test runs calls in an order
that would expose one of these against the float64 reference.
"""

from __future__ import annotations

import threading

import pytest
import torch

from sdft_kernels import fused_linear_sdft_loss, kept_workspace_bytes, release_workspace
from sdft_kernels.workspace import Workspace
from tests.kernels.helpers import assert_close, make_problem, run

F64 = dict(rtol=1e-9, atol=1e-11)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def released():
    release_workspace()
    yield
    release_workspace()


def _check_against_reference(p, upstream=None, **kw):
    out, grads = run(p, upstream, impl="torch", **kw)
    ref, ref_grads = run(p, upstream, impl="reference", **{k: v for k, v in kw.items() if k != "chunk_size"})
    assert_close(out.loss, ref.loss, **F64, what="loss")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, **F64, what=f"grad of leaf {i}")


def test_a_second_call_reuses_the_storage_and_a_larger_one_replaces_it():
    first = Workspace(8, 100, torch.float32, CPU)
    z = first.get("z", 8)
    first.get("extra", 8)
    first.close()
    assert kept_workspace_bytes() == 2 * 8 * 100 * 4

    second = Workspace(5, 100, torch.float32, CPU)  # smaller: a view of the same storage
    assert second.get("z", 5).data_ptr() == z.data_ptr() and second.get("z", 5).shape == (5, 100)
    second.close()  # "extra" was not used by the last call: freed
    assert kept_workspace_bytes() == 8 * 100 * 4

    third = Workspace(9, 100, torch.float32, CPU)  # larger: new storage, the old one dropped
    assert third.get("z", 9).shape == (9, 100)
    third.close()
    assert kept_workspace_bytes() == 9 * 100 * 4
    fourth = Workspace(9, 100, torch.float64, CPU)  # another dtype: new storage
    assert fourth.get("z", 9).dtype == torch.float64
    fourth.close()
    assert kept_workspace_bytes() == 9 * 100 * 8
    assert release_workspace() == 9 * 100 * 8 and kept_workspace_bytes() == 0


def test_other_devices_keep_nothing():
    ws = Workspace(4, 16, torch.float32, torch.device("meta"))
    assert ws.get("z", 4).shape == (4, 16)
    ws.close()
    assert kept_workspace_bytes() == 0


def test_keeping_can_be_switched_off_from_the_environment(monkeypatch):
    """``SDFT_KEEP_WORKSPACE=0``: a call's CPU buffers go when it ends (a training step's peak
    then holds none of them); the loss is the same; a value it does not know is named."""
    p = make_problem(N=37, V=203, seed=1)
    monkeypatch.setenv("SDFT_KEEP_WORKSPACE", "0")
    _check_against_reference(p, chunk_size=8)
    assert kept_workspace_bytes() == 0
    monkeypatch.setenv("SDFT_KEEP_WORKSPACE", "on")
    _check_against_reference(p, chunk_size=8)
    assert kept_workspace_bytes() > 0
    monkeypatch.setenv("SDFT_KEEP_WORKSPACE", "maybe")
    with pytest.raises(ValueError, match="SDFT_KEEP_WORKSPACE must be 1 or 0 .*got 'maybe'"):
        Workspace(4, 16, torch.float32, torch.device("cpu"))


def test_calls_of_changing_shapes_each_match_the_reference():
    """Rows, vocabulary and chunking change from call to call, larger and smaller, so that the
    kept storage is reused at another shape and replaced; a stale view or row stride would
    show in the loss or the gradients."""
    for N, V, chunk in [(37, 203, 8), (50, 301, 16), (21, 97, 5), (37, 203, 8), (64, 500, 32)]:
        _check_against_reference(make_problem(N=N, V=V, seed=N + V), chunk_size=chunk, temperature=0.5,
                                 kl_weight=0.7)
        assert kept_workspace_bytes() > 0


def test_backwards_that_recompute_after_other_calls_stay_exact():
    """reduction="none" recomputes the chunks in the backward: two losses' forwards, then their
    backwards in the opposite order, all through the same kept storage."""
    p1, p2 = make_problem(N=33, V=150, seed=1), make_problem(N=40, V=260, seed=2)
    kw = dict(reduction="none", impl="torch", chunk_size=7, temperature=0.7, return_components=True)
    outs = [fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, **kw) for p in (p1, p2)]
    ups = [torch.randn(o.loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
           for i, o in enumerate(outs)]
    for o, u in zip(reversed(outs), reversed(ups)):
        o.loss.backward(u)
    for p, o, u in zip((p1, p2), outs, ups):
        got = [p.h.grad.clone(), p.W.grad.clone()]
        ref, ref_grads = run(p, u, impl="reference", reduction="none", temperature=0.7)
        assert_close(o.loss, ref.loss, **F64, what="loss")
        for i, (g, r) in enumerate(zip(got, ref_grads)):
            assert_close(g, r, **F64, what=f"grad of leaf {i}")


def test_training_after_an_inference_mode_call():
    """Storage allocated under inference mode cannot be written outside it: the next training
    call must get its own."""
    p = make_problem(N=30, V=180)
    with torch.inference_mode():
        fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, impl="torch", chunk_size=8)
    assert kept_workspace_bytes() > 0
    _check_against_reference(p, chunk_size=8)


def test_threads_keep_their_own_storage():
    """Two threads computing different losses at once: each thread has its own buffers."""
    problems = [make_problem(N=300, V=2000, seed=s) for s in (3, 4)]
    errors = []

    def work(p):
        try:
            for _ in range(3):
                _check_against_reference(p, chunk_size=64)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in problems]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
