"""Problem builders and comparison helpers shared by the kernel tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from sdft_kernels import LossOptions, fused_linear_sdft_loss
from sdft_kernels.reduction import counted_masks, normaliser, row_scales
from tests.kernels import rounding


@dataclass
class Problem:
    h: Tensor
    W: Tensor
    labels: Tensor
    ht: Optional[Tensor] = None
    Wt: Optional[Tensor] = None
    b: Optional[Tensor] = None
    bt: Optional[Tensor] = None
    kl_mask: Optional[Tensor] = None

    def leaves(self) -> list[Tensor]:
        """The tensors that receive gradients."""
        return [t for t in (self.h, self.W, self.b) if t is not None and t.requires_grad]

    def cast(self, dtype: torch.dtype, teacher_dtype: Optional[torch.dtype] = None) -> "Problem":
        """Same values in ``dtype`` (the teacher's in ``teacher_dtype``, default the same),
        as fresh leaves. A head shared by student and teacher stays shared."""
        teacher_dtype = teacher_dtype or dtype

        def c(t, grad, to=dtype):
            return None if t is None else t.detach().to(to).requires_grad_(grad and t.requires_grad)
        W = c(self.W, True)
        Wt = W.detach() if self.Wt is self.W and teacher_dtype == dtype else c(self.Wt, False, teacher_dtype)
        return Problem(c(self.h, True), W, self.labels, c(self.ht, False, teacher_dtype), Wt,
                       c(self.b, True), c(self.bt, False, teacher_dtype), self.kl_mask)

    def logits(self) -> tuple[Tensor, Optional[Tensor]]:
        """``(z_s, z_t)``: the ``[N, V]`` logits before bias and softcap, detached."""
        z_t = None if self.ht is None else (self.ht @ self.Wt.T).detach()
        return (self.h @ self.W.T).detach(), z_t

    def row_scales(self, seed: int = 1, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
        """``(ce_scale, kl_scale)`` ``[N]``, as the backward kernels and the chunk epilogue take
        them: a random upstream gradient of either sign, restricted to the counted rows."""
        g = torch.Generator(device=self.labels.device).manual_seed(seed)
        kl_rows = self.kl_mask if self.kl_mask is not None else self.labels != ignore_index
        rnd = torch.randn(2, self.labels.numel(), generator=g, dtype=torch.float64, device=self.labels.device)
        acc = torch.float64 if self.h.dtype == torch.float64 else torch.float32
        return (rnd[0] * (self.labels != ignore_index)).to(acc), (rnd[1] * kl_rows).to(acc)


def make_problem(
    N=37, D=24, V=203, Dt=None, *, teacher=True, bias=False, teacher_bias=None, shared_head=False,
    ignore_frac=0.2, ignore_index=-100, kl_mask=False, dtype=torch.float64, scale=1.0, logit_scale=1.0,
    seed=0, weight_grad=True, device="cpu",
) -> Problem:
    """A ragged problem with about ``ignore_frac`` ignored labels; the teacher is a perturbed
    copy of the student so that the divergence is small but not zero, as in fine-tuning.

    ``scale`` multiplies the hidden states, ``logit_scale`` the heads and biases (logits of
    about that size); ``teacher_bias`` defaults to ``bias``; ``shared_head``: the teacher's
    head is the student's own tensor. Drawn on ``device`` (CPU draws of LLM-sized heads take
    seconds each)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, device=device)  # noqa: E731
    h = rnd(N, D) * scale
    W = rnd(V, D) * (logit_scale / D**0.5)
    labels = torch.randint(0, V, (N,), generator=g, device=device)
    labels[torch.rand(N, generator=g, device=device) < ignore_frac] = ignore_index
    p = Problem(h, W, labels)
    if bias:
        p.b = rnd(V) * 0.5 * logit_scale
    if teacher:
        Dt = D if Dt is None or shared_head else Dt
        p.ht = h[:, :Dt] + 0.3 * rnd(N, Dt) if Dt <= D else rnd(N, Dt) * scale
        p.Wt = (W[:, :Dt] + 0.3 * rnd(V, Dt) * (logit_scale / Dt**0.5)) if Dt <= D else rnd(V, Dt) * (logit_scale / Dt**0.5)
        if bias if teacher_bias is None else teacher_bias:
            p.bt = rnd(V) * 0.5 * logit_scale
    if kl_mask:  # differs from the label mask: some ignored positions carry the KL, some labelled do not
        p.kl_mask = torch.rand(N, generator=g, device=device) < 0.7
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    out = Problem(cast(h), cast(W), labels, cast(p.ht), cast(p.Wt), cast(p.b), cast(p.bt), p.kl_mask)
    out.h.requires_grad_(True)
    out.W.requires_grad_(weight_grad)
    if shared_head:
        out.Wt = out.W.detach()
    if out.b is not None:
        out.b.requires_grad_(True)
    return out


def run(problem: Problem, upstream: Optional[Tensor] = None, **kw):
    """Loss components and gradients of the leaves, for a given upstream gradient."""
    for t in problem.leaves():
        t.grad = None
    out = fused_linear_sdft_loss(
        problem.h, problem.W, problem.labels, problem.ht, problem.Wt,
        student_bias=problem.b, teacher_bias=problem.bt, kl_mask=problem.kl_mask, return_components=True, **kw,
    )
    g = torch.ones_like(out.loss) if upstream is None else upstream.to(out.loss.dtype)
    grads = []
    if problem.leaves():
        out.loss.backward(g)
        grads = [t.grad.clone() for t in problem.leaves()]
    return out, grads


def assert_close(actual: Tensor, expected: Tensor, rtol: float, atol: float, what: str) -> None:
    """Like torch.testing.assert_close, but the message names the worst element."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    if not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else ()
        raise AssertionError(
            f"{what}: worst element {idx}: got {actual.flatten()[i]:.10g}, expected {expected.flatten()[i]:.10g} "
            f"(abs err {err.flatten()[i]:.3g} > {bound.flatten()[i]:.3g})"
        )


def loss_options(**kw) -> LossOptions:
    """The :class:`LossOptions` among :func:`run`'s keyword arguments (the rest: impl,
    chunk_size, num_items...)."""
    names = {f.name for f in dataclasses.fields(LossOptions)}
    return LossOptions(**{k: v for k, v in kw.items() if k in names})


def rounding_bounds(problem: Problem, upstream: Optional[Tensor] = None, num_items=None, partial_sums: int = 1,
                    **kw) -> tuple[dict[str, Tensor], list[Tensor]]:
    """Bounds on how far :func:`run` on ``problem`` (in its own dtypes) may be from the float64
    truth on the same inputs: ``({"loss", "ce", "kl"}, [one per leaf])``, from the worst-case
    rounding analysis of :mod:`tests.kernels.rounding`. ``partial_sums``: how often a chunked
    path may round the weight gradient's running sum to a half-precision dtype (its chunk
    count); ``kw``: the loss options given to :func:`run`."""
    o = loss_options(**kw)
    p = problem
    logits = rounding.Logits.of(p.h, p.W, p.b, p.ht, p.Wt, p.bt, o)
    label_mask, kl_rows = counted_masks(p.labels, p.kl_mask, o.ignore_index)
    if p.ht is None:
        kl_rows = torch.zeros_like(label_mask)
    denom = normaliser(label_mask, num_items, torch.float64)
    values = rounding.loss_bounds(logits, p.labels, kl_rows, denom)
    leaves = p.leaves()
    if not leaves:
        return values, []
    g = torch.ones((), dtype=torch.float64) if upstream is None else upstream.double()
    ce_scale, kl_scale = row_scales(g.to(denom.device), denom, label_mask, kl_rows, o)
    G, A = rounding.logit_gradient_error(logits, p.labels, kl_rows, ce_scale, kl_scale, p.h.dtype)
    dh, dW, db = rounding.gradient_bounds(G, A, p.h, p.W, p.b is not None, logits.acc, partial_sums)
    by_leaf = {id(p.h): dh, id(p.W): dW}
    if p.b is not None:
        by_leaf[id(p.b)] = db
    return values, [by_leaf[id(t)] for t in leaves]


def assert_within_rounding(truth, fast, bounds, what: str) -> None:
    """``fast`` (``(SDFTLossOutput, grads)`` from :func:`run`) within ``bounds``
    (:func:`rounding_bounds`) of ``truth`` (the same from the float64 problem): loss, ce, kl and
    every gradient, entry by entry."""
    (t_out, t_grads), (f_out, f_grads), (b_values, b_grads) = truth, fast, bounds
    for name in ("loss", "ce", "kl"):
        rounding.assert_within(f"{what} {name}", getattr(f_out, name), getattr(t_out, name), b_values[name])
    assert len(f_grads) == len(t_grads) == len(b_grads)
    for i, (g, t, b) in enumerate(zip(f_grads, t_grads, b_grads)):
        rounding.assert_within(f"{what} grad {i}", g, t, b)


def assert_within_scale(low: Problem, truth, got, what: str, truth_dtype: torch.dtype = torch.float64, **kw) -> None:
    """:func:`assert_within_rounding` for vocabularies too large for per-entry gradient bounds
    (the GPU tests): ``loss``, ``ce`` and ``kl`` within their rounding bounds, every gradient
    within :func:`tests.kernels.rounding.gradient_rtol` of the truth relative to its scale
    (norm-wise, per row, exact zeros kept; :func:`tests.kernels.rounding.assert_relative`).

    ``truth`` and ``got`` as from :func:`run`: ``truth`` on the same inputs as ``low``, in
    ``truth_dtype`` (float32 where float64 ``[N, V]`` matrices are too large: its own rounding
    is then added to the bounds)."""
    o = loss_options(**kw)
    work = torch.float64 if truth_dtype == torch.float64 else torch.float32
    label_mask, kl_rows = counted_masks(low.labels, low.kl_mask, o.ignore_index)
    if low.ht is None:
        kl_rows = torch.zeros_like(label_mask)
    denom = normaliser(label_mask, None, work)
    values, rtol = {k: 0.0 for k in ("loss", "ce", "kl")}, 0.0
    for p in (low,) if truth_dtype == torch.float64 else (low, low.cast(truth_dtype)):
        logits = rounding.Logits.of(p.h, p.W, p.b, p.ht, p.Wt, p.bt, o, work=work)
        for name, bound in rounding.loss_bounds(logits, p.labels, kl_rows, denom).items():
            values[name] = values[name] + bound
        rtol += rounding.gradient_rtol(logits, p.h.dtype)
        del logits
    (t_out, t_grads), (g_out, g_grads) = truth, got
    for name in ("loss", "ce", "kl"):
        rounding.assert_within(f"{what} {name}", getattr(g_out, name), getattr(t_out, name), values[name])
    assert len(g_grads) == len(t_grads)
    for i, (g, t) in enumerate(zip(g_grads, t_grads)):
        rounding.assert_relative(f"{what} grad {i}", g, t, rtol)
