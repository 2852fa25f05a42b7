"""Problem builders and comparison helpers shared by the kernel tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from sdft_kernels import fused_linear_sdft_loss


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

    def cast(self, dtype: torch.dtype) -> "Problem":
        """Same values in ``dtype`` (fresh leaves)."""
        def c(t, grad):
            return None if t is None else t.detach().to(dtype).requires_grad_(grad and t.requires_grad)
        return Problem(c(self.h, True), c(self.W, True), self.labels, c(self.ht, False), c(self.Wt, False),
                       c(self.b, True), c(self.bt, False), self.kl_mask)


def make_problem(
    N=37, D=24, V=203, Dt=None, *, teacher=True, bias=False, ignore_frac=0.2, kl_mask=False,
    dtype=torch.float64, scale=1.0, seed=0, weight_grad=True, device="cpu",
) -> Problem:
    """A ragged problem with about ``ignore_frac`` ignored labels; the teacher is a perturbed
    copy of the student so that the divergence is small but not zero, as in fine-tuning.

    Drawn on ``device`` (CPU draws of LLM-sized heads take seconds each)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, device=device)  # noqa: E731
    h = rnd(N, D) * scale
    W = rnd(V, D) / D**0.5
    labels = torch.randint(0, V, (N,), generator=g, device=device)
    labels[torch.rand(N, generator=g, device=device) < ignore_frac] = -100
    p = Problem(h, W, labels)
    if bias:
        p.b = rnd(V) * 0.5
    if teacher:
        Dt = D if Dt is None else Dt
        p.ht = h[:, :Dt] + 0.3 * rnd(N, Dt) if Dt <= D else rnd(N, Dt) * scale
        p.Wt = (W[:, :Dt] + 0.3 * rnd(V, Dt) / Dt**0.5) if Dt <= D else rnd(V, Dt) / Dt**0.5
        if bias:
            p.bt = rnd(V) * 0.5
    if kl_mask:  # differs from the label mask: some ignored positions carry the KL, some labelled do not
        p.kl_mask = torch.rand(N, generator=g, device=device) < 0.7
    out = Problem(h.to(dtype), W.to(dtype), labels, *(None if t is None else t.to(dtype) for t in (p.ht, p.Wt, p.b, p.bt)), p.kl_mask)
    out.h.requires_grad_(True)
    out.W.requires_grad_(weight_grad)
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


def assert_no_worse_than_plain(truth, plain, fast, slack: float, what: str) -> None:
    """``fast``'s error against ``truth`` is within ``plain``'s error plus ``slack`` (relative).

    Each argument is ``(SDFTLossOutput, grads)`` from :func:`run`: the float64 (or highest
    precision) truth, plain torch at the tested dtype, and the implementation under test.
    """
    (t_out, t_grads), (p_out, p_grads), (f_out, f_grads) = truth, plain, fast
    pairs = [(name, getattr(t_out, name), getattr(p_out, name), getattr(f_out, name)) for name in ("loss", "ce", "kl")]
    pairs += [(f"grad {i}", t, p, g) for i, (t, p, g) in enumerate(zip(t_grads, p_grads, f_grads))]
    for name, t, p, g in pairs:
        t, p, g = t.double(), p.double(), g.double()
        bound = (p - t).abs().max() + slack * (1 + t.abs().max())
        err = (g - t).abs().max()
        assert err <= bound, f"{what} {name}: err {err:.3g} > plain torch's {(p - t).abs().max():.3g} + slack = {bound:.3g}"
