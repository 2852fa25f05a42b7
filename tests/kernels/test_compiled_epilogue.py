"""The compiled CPU epilogue of ``impl="torch"`` (sdft_kernels/compiled_epilogue.py).

Each compiled variant costs seconds of compilation, so the variants here are few and chosen to
reach every branch of the compiled math between them: the three divergences, both softcaps and
logit scales, biases with -inf entries, DFT, the metrics, no teacher, the forward alone,
``1 / tau`` integer (the squared exponential) and not, float64 and float32.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from sdft_kernels import compiled_epilogue
from sdft_kernels.compiled_epilogue import compile_mode, compiled_variants
from tests.kernels.helpers import assert_close, assert_within_rounding, make_problem, rounding_bounds, run

F64 = dict(rtol=1e-9, atol=1e-11)


@pytest.fixture
def compiled(monkeypatch):
    """Every chunk through the compiled epilogue, from a clean slate of compiled variants."""
    monkeypatch.setenv("SDFT_COMPILE", "always")
    torch._dynamo.reset()
    monkeypatch.setattr(compiled_epilogue._Compiled, "variants", set())
    monkeypatch.setattr(compiled_epilogue._Compiled, "failed", None)
    yield
    torch._dynamo.reset()


def _masked_biases(p):
    """-inf on some vocabulary entries of the teacher's bias and, elsewhere, the student's."""
    V = p.W.shape[0]
    with torch.no_grad():
        p.b[torch.arange(3, V, 17)] = float("-inf")
    p.bt = p.bt.clone()
    p.bt[:40] = float("-inf")
    p.labels = torch.where((p.labels % 17 == 3) & (p.labels >= 3), -100, p.labels)  # no label on a masked entry


VARIANTS = {
    "forward_kl+bias+metrics": dict(problem=dict(bias=True, kl_mask=True), loss=dict(metrics=True, temperature=0.5)),
    "reverse_kl+caps+scales+none": dict(
        problem=dict(), upstream=True,
        loss=dict(divergence="reverse_kl", student_softcap=3.0, teacher_softcap=5.0, student_logit_scale=0.8,
                  teacher_logit_scale=1.5, reduction="none", temperature=0.7),
    ),
    "jsd+dft+masked-vocabulary": dict(
        problem=dict(bias=True), masked=True,
        loss=dict(divergence="jsd", jsd_beta=0.3, loss_type="dft", temperature=1.0 / 3, ce_weight=0.6, kl_weight=1.4),
    ),
    "no-teacher+cap+metrics": dict(problem=dict(teacher=False), loss=dict(softcap=2.5, metrics=True)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_compiled_matches_the_reference_in_float64(compiled, name):
    spec = VARIANTS[name]
    p = make_problem(N=37, D=24, V=203, **spec["problem"])
    if spec.get("masked"):
        _masked_biases(p)
    upstream = torch.randn(37, dtype=torch.float64) if spec.get("upstream") else None
    ref, ref_grads = run(p, upstream, impl="reference", **spec["loss"])
    out, grads = run(p, upstream, impl="torch", chunk_size=8, **spec["loss"])
    assert compiled_variants() >= 1, "the compiled epilogue did not run"
    for field in ("loss", "ce", "kl", "entropy"):
        if getattr(ref, field) is not None:
            assert_close(getattr(out, field), getattr(ref, field), what=f"{name} {field}", **F64)
    if ref.top1 is not None:
        assert torch.equal(out.top1, ref.top1)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, what=f"{name} grad of leaf {i}", **F64)


def test_compiled_forward_alone_matches_the_reference(compiled):
    p = make_problem(N=37, D=24, V=203, bias=True)
    for t in p.leaves():
        t.requires_grad_(False)
    out = run(p, impl="torch", chunk_size=8, metrics=True)[0]
    ref = run(p, impl="reference", metrics=True)[0]
    assert compiled_variants() == 1
    for field in ("loss", "ce", "kl", "entropy"):
        assert_close(getattr(out, field), getattr(ref, field), what=field, **F64)


def test_compiled_float32_within_rounding_of_the_float64_truth(compiled):
    """What CPU users train with: float32, tau 0.5 (the student's tempered softmax from the
    squared exponential), the paper's forward KL; within the worst-case rounding bounds the
    eager epilogue is held to, entry by entry."""
    truth_problem = make_problem(N=45, D=32, V=311, bias=True, logit_scale=4.0)
    low = truth_problem.cast(torch.float32)
    truth_problem = low.cast(torch.float64)
    upstream = torch.tensor(1.3, dtype=torch.float64)
    kw = dict(temperature=0.5, kl_weight=1.0)
    truth = run(truth_problem, upstream, impl="reference", **kw)
    fast = run(low, upstream, impl="torch", chunk_size=16, **kw)
    assert compiled_variants() == 1
    bounds = rounding_bounds(low, upstream, partial_sums=3, **kw)
    assert_within_rounding(truth, fast, bounds, "compiled float32")


def test_new_row_counts_and_vocabularies_do_not_recompile(compiled):
    """The chunks' rows (a shorter last chunk, another batch) and the vocabulary are dynamic:
    one compiled graph serves them all."""
    from torch._dynamo.utils import counters

    run(make_problem(N=37, D=24, V=203), impl="torch", chunk_size=8)
    graphs = counters["stats"]["unique_graphs"]
    for N, V, chunk, ignored in ((50, 203, 16, 0.2), (23, 203, 8, 0.2), (64, 331, 9, 0.2), (7, 150, 5, 0.2),
                                 (40, 203, 16, 0.0)):  # nothing ignored: the chunks are views, not copies
        p = make_problem(N=N, D=24, V=V, seed=N, ignore_frac=ignored)
        out, grads = run(p, impl="torch", chunk_size=chunk)
        ref, ref_grads = run(p, impl="reference")
        assert_close(out.loss, ref.loss, what=f"N={N} V={V} loss", **F64)
    assert counters["stats"]["unique_graphs"] == graphs, "a new shape recompiled the epilogue"
    assert compiled_variants() == 1


def test_by_default_large_chunks_compile_and_agree_with_float64(monkeypatch):
    """What a CPU user gets without setting anything: chunks of 4M+ logits go through the
    compiled passes, within float32 rounding of the float64 loss."""
    monkeypatch.delenv("SDFT_COMPILE", raising=False)
    torch._dynamo.reset()
    monkeypatch.setattr(compiled_epilogue._Compiled, "variants", set())
    p = make_problem(N=300, D=8, V=32768, dtype=torch.float32, ignore_frac=0.2)
    assert 150 * 32768 >= compiled_epilogue.MIN_COMPILED_ELEMENTS
    out, grads = run(p, impl="torch", chunk_size=150)
    assert compiled_variants() == 1
    truth, truth_grads = run(p.cast(torch.float64), impl="reference")
    assert_close(out.loss, truth.loss, rtol=1e-5, atol=0.0, what="loss")
    for i, (g, r) in enumerate(zip(grads, truth_grads)):
        assert_close(g, r, rtol=1e-4, atol=1e-4 * float(r.abs().max()), what=f"grad of leaf {i}")
    torch._dynamo.reset()


def test_small_chunks_stay_eager_under_auto(monkeypatch):
    monkeypatch.setenv("SDFT_COMPILE", "auto")
    monkeypatch.setattr(compiled_epilogue._Compiled, "variants", set())
    p = make_problem(N=37, D=24, V=203)
    run(p, impl="torch")
    assert 37 * 203 < compiled_epilogue.MIN_COMPILED_ELEMENTS
    assert compiled_variants() == 0


_TWO_DIMENSIONAL_ALLOCATION = re.compile(r"empty_strided_\w+\(\((\w+), (\w+)\)")


@pytest.mark.parametrize("divergence,temperature,cap,passes", [("forward_kl", 0.5, None, 2), ("jsd", 0.7, 2.5, 3)])
def test_the_compiled_passes_allocate_no_chunk_sized_buffer(compiled, divergence, temperature, cap, passes):
    """The point of splitting the passes: every ``[C, V]`` value lives in the workspace. A buffer that
    inductor allocates itself comes fresh each chunk and, beyond the C allocator's heap
    threshold, is page-faulted in every time; the generated code must hold none."""
    from torch._inductor.utils import run_and_get_code

    p = make_problem(N=37, D=24, V=203, bias=True, dtype=torch.float32)
    kw = dict(divergence=divergence, temperature=temperature, student_softcap=cap, metrics=True)
    with torch._inductor.config.patch(fx_graph_cache=False):
        _, sources = run_and_get_code(lambda: run(p, impl="torch", chunk_size=8, **kw))
    assert compiled_variants() == 1 and len(sources) == passes, f"not all {passes} compiled passes ran"
    for source in sources:
        shapes = [m.groups() for m in _TWO_DIMENSIONAL_ALLOCATION.finditer(source)]
        assert not [s for s in shapes if "1" not in s], f"[C, V] buffers allocated by the compiled code: {shapes}"


@pytest.mark.parametrize("divergence,cap", [("forward_kl", None), ("jsd", 2.5)])
def test_compiled_chunks_take_more_rows_in_the_same_memory_budget(compiled, monkeypatch, divergence, cap):
    """Compiled, a chunk holds two ``[C, V]`` buffers, the gradient written over the teacher's
    logits (the eager path four, eight for a capped JSD), so a binding budget gives it more
    rows; neither path's workspace exceeds the budget."""
    from sdft_kernels import chunk_loop
    from sdft_kernels.torch_epilogue import TorchEpilogue

    made = []

    class Recorded(chunk_loop.Workspace):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    V = 2048
    budget = 48 * 3 * 4 * V  # 48 rows of three float32 buffers
    monkeypatch.setattr(chunk_loop, "Workspace", Recorded)
    monkeypatch.setattr(TorchEpilogue, "budget_bytes", budget)
    p = make_problem(N=150, D=16, V=V, dtype=torch.float32)
    kw = dict(divergence=divergence, temperature=0.7, student_softcap=cap)
    held = {}
    for mode in ("always", "never"):
        monkeypatch.setenv("SDFT_COMPILE", mode)
        made.clear()
        out = run(p, impl="torch", **kw)
        (ws,) = made
        sizes = [b.numel() * b.element_size() for b in ws._buffers.values()]
        assert sum(sizes) <= budget, (mode, ws.rows, len(sizes))
        held[mode] = (ws.rows, len(sizes), out)
    (rows_c, buffers_c, out_c), (rows_e, buffers_e, out_e) = held["always"], held["never"]
    assert buffers_c == 2 and buffers_e > 3 and rows_c > rows_e, (held["always"][:2], held["never"][:2])
    assert_close(out_c[0].loss, out_e[0].loss, rtol=1e-5, atol=1e-6, what="loss")
    for i, (gc, ge) in enumerate(zip(out_c[1], out_e[1])):
        assert_close(gc, ge, rtol=1e-4, atol=1e-6, what=f"grad of leaf {i}")


def test_compiled_chunks_go_up_to_their_own_row_cap_where_the_budget_does_not_bind(monkeypatch):
    """With a small vocabulary the budget allows thousands of rows: the compiled passes then
    take chunks of up to COMPILED_MAX_CHUNK_ROWS, the eager ones up to MAX_CHUNK_ROWS, each
    evened out over the rows."""
    from sdft_kernels.chunk_loop import chunk_rows
    from sdft_kernels.compiled_epilogue import COMPILED_MAX_CHUNK_ROWS, CompiledTorchEpilogue
    from sdft_kernels.options import LossOptions
    from sdft_kernels.torch_epilogue import MAX_CHUNK_ROWS

    assert COMPILED_MAX_CHUNK_ROWS > MAX_CHUNK_ROWS
    options = LossOptions(kl_weight=1.0, temperature=0.5)
    rows = {}
    for mode in ("always", "never"):
        monkeypatch.setenv("SDFT_COMPILE", mode)
        rows[mode] = chunk_rows(1000, 2048, CompiledTorchEpilogue, torch.float32, torch.float32, options, None)
    assert rows == {"always": 334, "never": 250}  # 1000 rows in 3 chunks, in 4


@pytest.mark.parametrize("raw,mode", [(None, "auto"), ("auto", "auto"), ("always", "always"), ("0", "never"),
                                      ("Off", "never"), ("1", "always")])
def test_compile_mode_from_the_environment(monkeypatch, raw, mode):
    if raw is None:
        monkeypatch.delenv("SDFT_COMPILE", raising=False)
    else:
        monkeypatch.setenv("SDFT_COMPILE", raw)
    assert compile_mode() == mode


def test_a_bad_compile_mode_is_named(monkeypatch):
    monkeypatch.setenv("SDFT_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="SDFT_COMPILE.*'sometimes'"):
        run(make_problem(N=8, D=8, V=20), impl="torch")


_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import json, os, warnings
    import torch
    from sdft_kernels import fused_linear_sdft_loss
    from sdft_kernels.compiled_epilogue import compiled_variants
    from tests.kernels.helpers import make_problem, run

    p = make_problem(N=37, D=24, V=203, bias=True, dtype=torch.float32)
    results = {}
    for mode in ("always", "never"):
        os.environ["SDFT_COMPILE"] = mode
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, grads = run(p, impl="torch", chunk_size=8)
            out, grads = run(p, impl="torch", chunk_size=8)  # the failure is reported once
        results[mode] = dict(
            loss=out.loss.item(), grads=[g.tolist() for g in grads],
            warnings=[str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        )
    results["variants"] = compiled_variants()
    print("RESULT" + json.dumps(results))
    """
)


def test_without_a_compiler_the_eager_epilogue_serves(tmp_path):
    """A machine without a C++ compiler: the first compiled call fails, one warning says so,
    and every call computes exactly what the eager epilogue computes."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               TORCHINDUCTOR_FX_GRAPH_CACHE="0", PYTHONPATH=os.pathsep.join([os.path.join(root, "kernels"), root]))
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    results = json.loads(line[len("RESULT"):])
    failed, eager = results["always"], results["never"]
    assert len(failed["warnings"]) == 1 and "eager epilogue runs instead" in failed["warnings"][0], failed["warnings"]
    assert eager["warnings"] == []
    assert failed["loss"] == eager["loss"] and failed["grads"] == eager["grads"]
    assert results["variants"] == 0
