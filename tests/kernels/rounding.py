"""How far a loss computed in a floating-point dtype may be from its exact value.

The kernel tests compare a computation in float32 or half precision with the exact value on
the same (already rounded) inputs, carried through float64. How far apart the two may be
depends on the dtype, the values and the sizes summed over, not on the machine: every bound
here comes from a worst-case rounding analysis (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., ch. 2-4), which holds for any order of accumulation, so for any CPU,
SIMD width, BLAS, tiling or chunking. Notation:

- ``u``: the unit roundoff of a dtype (half its machine epsilon); rounding ``x`` to the dtype
  moves it by at most ``u |x| + eta`` (``eta``: half the dtype's subnormal spacing);
- ``gamma_n = n u / (1 - n u)``: a sum or dot product of ``n`` terms is within
  ``gamma_n * sum |terms|`` of the exact value, whatever the order of the additions.

The loss is computed in its accumulation dtype (float32; float64 for float64 inputs), and
half-precision GEMMs accumulate in float32 (cuBLAS, oneDNN and torch's own CPU kernels do).
The chain of bounds:

1. :meth:`Logits.of`: each logit ``h . w + b`` is a sum of ``D + 1`` terms, within
   ``gamma_{D+1} (|h| . |w| + |b|)``, plus one rounding when the GEMM stores it in half
   precision; the element-wise work of the loss on it (shift by the row maximum, division by
   tau, exp, softcap) adds a few roundings of the logit's size, counted as a logit error too.
2. :func:`first_order_bound`: a quantity ``f`` of the logits then moves by at most
   ``sum_v |df/dz_v| delta_v`` to first order, with ``df/dz`` from autograd on the float64
   truth. This is the sensitivity of each quantity at the values compared: 1 for a log-sum-exp
   in the max-norm, at most 2 for a cross-entropy, about ``4 / tau`` for a divergence at
   temperature tau, far less where the softmax is peaked or the two models agree.
3. the sums over the vocabulary (and over rows) round by at most ``gamma_n`` of the sum of
   the absolute values of their terms (:func:`sum_terms`, :func:`row_rounding`).
4. :func:`gradient_bounds`: the logit gradient's error per entry is the same first-order
   argument one derivative up (the Hessian of the loss in the logits, by double backward), and
   the leaf gradients come from it by GEMMs over V (hidden) and N (weight), each within
   ``gamma_n`` of its absolute products.

The analysis is first order in the logit error; :func:`curvature_margin` covers the rest.
These bounds need the full Hessian of each row (``N V^2`` numbers): for large vocabularies
:func:`gradient_rtol` gives a relative, norm-wise tolerance instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sdft_kernels.options import LossOptions
from sdft_kernels.reduction import accumulation_dtype
from sdft_kernels.reference import apply_softcap, divergence_rows, transform_logits


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: the largest relative rounding error of a dtype (half its machine epsilon)."""
    return torch.finfo(dtype).eps / 2


def underflow(dtype: torch.dtype) -> float:
    """``eta``: the largest absolute rounding error of a value in the dtype's subnormal range."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """``gamma_n = n u / (1 - n u)``: a sum of ``n`` terms computed in ``dtype``, in any order,
    is within ``gamma_n * sum |terms|`` of the exact sum (Higham, Lemma 3.1)."""
    nu = n * unit_roundoff(dtype)
    assert nu < 0.5, f"{n} terms in {dtype}: no useful bound (n u = {nu:.2g})"
    return nu / (1 - nu)


def output_roundoff(dtype: torch.dtype) -> float:
    """``u`` of a result stored in ``dtype`` after being computed in its accumulation dtype:
    0 when the two are the same (float32, float64), the dtype's own ``u`` for half precision."""
    return 0.0 if accumulation_dtype(dtype) == dtype else unit_roundoff(dtype)


def sum_terms(V: int) -> int:
    """How many roundings a row statistic over ``V`` logits goes through, at most: ``V``
    additions, the rescaling of the running sums of an online log-sum-exp (at most once per
    tile of at least 8 entries, a few roundings each: ``V`` more) and 16 for the operations
    around them (exp, log, the final differences)."""
    return 2 * V + 16


def curvature_margin(errors: list[Tensor], temperature: float) -> Tensor:
    """``exp(4 delta / min(tau, 1))`` per row, for the terms beyond first order.

    Along the segment from the exact to the computed logits every probability stays within a
    factor ``exp(2 delta / tau)`` of its exact value; the derivatives used here are products of
    at most two of them."""
    tau = min(temperature, 1.0)
    worst = torch.stack([e.amax(-1) for e in errors]).amax(0)
    return torch.exp(4 * worst / tau)


@dataclass
class Logits:
    """The exact pre-softcap logits of a problem, ``[N, V]`` in the working dtype (float64,
    or float32 for heads too large for it), and per entry a bound on how far the logits the
    loss works with (computed in the inputs' dtypes, then evaluated in the accumulation dtype)
    may be from them. The teacher's are None without a teacher."""

    x_s: Tensor
    err_s: Tensor
    x_t: Optional[Tensor]
    err_t: Optional[Tensor]
    options: LossOptions
    acc: torch.dtype  # the accumulation dtype of the computation bounded

    @classmethod
    def of(cls, h: Tensor, W: Tensor, b: Optional[Tensor], ht: Optional[Tensor], Wt: Optional[Tensor],
           bt: Optional[Tensor], options: LossOptions, work: torch.dtype = torch.float64) -> "Logits":
        """From the tensors in the dtypes they are computed in (student and teacher may differ)."""
        acc = accumulation_dtype(h.dtype)
        x_s, err_s = _logits_and_error(h, W, b, options, acc, work, "student")
        x_t = err_t = None
        if ht is not None:
            x_t, err_t = _logits_and_error(ht, Wt, bt, options, acc, work, "teacher")
        return cls(x_s, err_s, x_t, err_t, options, acc)

    @classmethod
    def given(cls, z_s: Tensor, z_t: Optional[Tensor], b: Optional[Tensor], bt: Optional[Tensor],
              options: LossOptions) -> "Logits":
        """Logits handed over as a tensor (the chunked epilogue's input), the bias added in
        the accumulation dtype: one rounding, and the loss's evaluation."""
        acc = accumulation_dtype(z_s.dtype)

        def one(z, bias, model):
            x = z.double() + (0.0 if bias is None else bias.double())
            return x, gamma(1, acc) * x.abs() + evaluation_error(x, options, acc, model)

        x_s, err_s = one(z_s, b, "student")
        x_t, err_t = one(z_t, bt, "teacher") if z_t is not None else (None, None)
        return cls(x_s, err_s, x_t, err_t, options, acc)

    def errors(self) -> list[Tensor]:
        return [e for e in (self.err_s, self.err_t) if e is not None]

    def leaves(self) -> tuple[Tensor, Optional[Tensor]]:
        """Fresh copies of the logits that record gradients."""
        x_t = None if self.x_t is None else self.x_t.detach().clone().requires_grad_(True)
        return self.x_s.detach().clone().requires_grad_(True), x_t

    def margin(self) -> Tensor:
        return curvature_margin(self.errors(), self.options.temperature)


def _logits_and_error(h, W, b, options: LossOptions, acc: torch.dtype, work: torch.dtype, model: str):
    dtype = h.dtype
    hw, Ww = h.detach().to(work), W.detach().to(work)
    x = F.linear(hw, Ww, None if b is None else b.detach().to(work))
    size = hw.abs() @ Ww.abs().T
    if b is not None:
        size += b.detach().to(work).abs()
    err = gamma(h.shape[-1] + 1, acc) * size
    u_out = output_roundoff(dtype)
    if u_out:  # the GEMM's float32 sum stored in half precision
        err = err + u_out * (x.abs() + err) + underflow(dtype)
    return x, err + evaluation_error(x, options, acc, model)


def transform(x: Tensor, options: LossOptions, model: str) -> Tensor:
    """``model``'s ("student" or "teacher") logits after its logit scale and softcap."""
    if model == "student":
        return transform_logits(x, options.student_logit_scale, options.student_cap)
    return transform_logits(x, options.teacher_logit_scale, options.teacher_cap)


def evaluation_error(x: Tensor, options: LossOptions, acc: torch.dtype, model: str = "student") -> Tensor:
    """The loss's element-wise work on ``model``'s logits ``x`` (before its logit scale and
    softcap), as an equivalent error of ``x``.

    ``(z - m) / tau`` rounds by ``u (|z| + |m|)`` twice over, and ``exp`` to a few units in
    the last place of its result, a shift of its argument by ``4 u`` (``4 u tau`` in logit
    units); the reverse KL and JSD gradients subtract ``z_s / tau`` and ``z_t / tau``. With a
    softcap, ``c tanh(y / c)`` adds ``u (|y| + 8 c)``; every error of the capped logit counts
    ``1 / tanh'`` times in units of ``y``. A logit scale ``y = s x`` rounds by ``u |y|``, and
    an error of ``y`` is ``1 / |s|`` times one of ``x``.
    """
    u = unit_roundoff(acc)
    scale, cap = ((options.student_logit_scale, options.student_cap) if model == "student"
                  else (options.teacher_logit_scale, options.teacher_cap))
    y = x * scale
    z = apply_softcap(y, cap)
    m = z.amax(-1, keepdim=True)
    err = u * (4 * z.abs() + 4 * m.abs() + 8 * max(1.0, options.temperature))
    if cap is not None:
        err = (err + u * (y.abs() + 8 * cap)) / (1 - (z / cap) ** 2)
    if scale != 1.0:
        err = (err + u * y.abs()) / abs(scale)
    return err


def loss_rows(x_s: Tensor, x_t: Optional[Tensor], labels: Tensor, kl_rows: Tensor, options: LossOptions):
    """``(ce_rows, div_rows)``, ``[N]``, of finite pre-softcap logits as the reference computes
    them: CE where the label counts, the divergence where ``kl_rows`` (0 elsewhere)."""
    o = options
    z_s = transform(x_s, o, "student")
    counted = labels != o.ignore_index
    safe = labels.masked_fill(~counted, 0)
    ce = torch.where(counted, z_s.logsumexp(-1) - z_s.gather(-1, safe[:, None])[:, 0], 0.0)
    if x_t is None:
        return ce, torch.zeros_like(ce)
    z_t = transform(x_t, o, "teacher")
    tau = o.temperature
    logp_s, logp_t = torch.log_softmax(z_s / tau, -1), torch.log_softmax(z_t / tau, -1)
    if o.effective_divergence == "jsd":
        div = _jsd_rows(logp_s, logp_t, o.jsd_beta)
    else:
        div = divergence_rows(logp_s, logp_t, o.effective_divergence, o.jsd_beta)
    return ce, torch.where(kl_rows, div, 0.0)


def _jsd_rows(logp_s: Tensor, logp_t: Tensor, beta: float) -> Tensor:
    """The reference's JSD for finite logits, with a log-add-exp whose second derivative stays
    finite for arguments far apart (torch.logaddexp's turns into NaN there, as with logits of
    1e4)."""
    a, b = logp_t + math.log(beta), logp_s + math.log1p(-beta)
    log_m = torch.maximum(a, b) + torch.log1p(torch.exp(-(a - b).abs()))
    kl_t = (logp_t.exp() * (logp_t - log_m)).sum(-1)
    kl_s = (logp_s.exp() * (logp_s - log_m)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def first_order_bound(value: Tensor, x_s: Tensor, x_t: Optional[Tensor], logits: Logits) -> Tensor:
    """``sum_v |d value / dz_v| delta_v`` (times :func:`curvature_margin`): how far ``value``,
    computed by autograd from the leaves ``x_s``, ``x_t`` (:meth:`Logits.leaves`), may move
    when the logits carry ``logits``' errors. ``value`` is a scalar, or ``[N]`` with row i a
    function of row i of the logits only (per-row statistics); the bound has its shape."""
    if not value.requires_grad:  # a constant (a statistic that is 0 without a teacher)
        return torch.zeros_like(value)
    leaves = [x for x in (x_s, x_t) if x is not None]
    grads = torch.autograd.grad(value.sum(), leaves, retain_graph=True, allow_unused=True)
    per_row = sum((g.abs() * e).sum(-1) for g, e in zip(grads, logits.errors()) if g is not None)
    per_row = per_row * logits.margin()
    return per_row.sum() if value.dim() == 0 else per_row


def row_magnitudes(x_s: Tensor, x_t: Optional[Tensor], labels: Tensor, options: LossOptions):
    """``((ce_sums, ce_after), (div_sums, div_after))``, ``[N]`` each: how large the terms are
    that a row's cross-entropy and divergence are made of, for :func:`row_rounding`. ``sums``:
    the sums over the vocabulary, relative to their own size (a log-sum's sum counts 1: its
    relative error is the log's absolute one); ``after``: the few row numbers combined after
    them.

    CE is ``(m - z_y) + log-sum``. A KL sums ``p (a - a')`` over the entries (a = z / tau, p the
    first model's probabilities) and subtracts the two log-sum-exps, ``m / tau + log-sum`` each;
    the JSD sums ``p (log p - log m)`` for both models, with the log-sums inside each ``log p``.
    """
    with torch.no_grad():
        o = options
        z_s = transform(x_s, o, "student")
        m = z_s.amax(-1)
        log_sum_1 = (z_s - m[:, None]).logsumexp(-1)
        counted = labels != o.ignore_index
        z_y = z_s.gather(-1, labels.masked_fill(~counted, 0)[:, None])[:, 0]
        one = torch.ones_like(m)
        ce = (one, (m - z_y).abs() + log_sum_1)
        if x_t is None:
            return ce, (0 * one, 0 * one)
        z_t = transform(x_t, o, "teacher")
        tau = o.temperature
        m_t = z_t.amax(-1)
        log_sums = ((z_s - m[:, None]) / tau).logsumexp(-1) + ((z_t - m_t[:, None]) / tau).logsumexp(-1)
        logp_s, logp_t = torch.log_softmax(z_s / tau, -1), torch.log_softmax(z_t / tau, -1)
        divergence = o.effective_divergence
        if divergence == "jsd":
            log_m = torch.logaddexp(logp_t + math.log(o.jsd_beta), logp_s + math.log1p(-o.jsd_beta))
            terms = (logp_s.exp() * (logp_s - log_m).abs() + logp_t.exp() * (logp_t - log_m).abs()).sum(-1)
            return ce, (2 + terms, terms + log_sums)
        p = logp_t.exp() if divergence == "forward_kl" else logp_s.exp()
        terms = (p * ((z_s - z_t) / tau).abs()).sum(-1)
        return ce, (2 + terms, terms + (m - m_t).abs() / tau + log_sums)


def row_rounding(value: Tensor, sums: Tensor, after: Tensor, V: int, acc: torch.dtype) -> Tensor:
    """The rounding of a row statistic over ``V`` logits, beyond its logits' errors:
    ``gamma_{2V+16} * sums + 8 u (|value| + after)`` (:func:`row_magnitudes`; a log-sum has
    ``sums`` 1 and ``after`` 0)."""
    return gamma(sum_terms(V), acc) * sums + 8 * unit_roundoff(acc) * (value.detach().abs() + after)


def row_bounds(logits: Logits, labels: Tensor, kl_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Bounds on the rows ``(ce_rows, div_rows)``, ``[N]``, of :func:`loss_rows`: first order
    in the logit errors, plus the rounding of each row's sums over V."""
    o = logits.options
    x_s, x_t = logits.leaves()
    ce_rows, div_rows = loss_rows(x_s, x_t, labels, kl_rows, o)
    m_ce, m_div = row_magnitudes(logits.x_s, logits.x_t, labels, o)
    V = x_s.shape[1]
    counted = labels != o.ignore_index
    ce = first_order_bound(ce_rows, x_s, x_t, logits) + row_rounding(ce_rows, *m_ce, V, logits.acc) * counted
    div = first_order_bound(div_rows, x_s, x_t, logits) + row_rounding(div_rows, *m_div, V, logits.acc) * kl_rows
    return ce.detach(), div.detach()


def loss_bounds(logits: Logits, labels: Tensor, kl_rows: Tensor, denom: Tensor) -> dict[str, Tensor]:
    """Bounds on ``loss``, ``ce`` and ``kl`` as :func:`sdft_kernels.fused_linear_sdft_loss`
    returns them (scalars, or ``[N]`` rows for ``reduction="none"``), computed in the dtypes
    of ``logits``; ``denom``: the normaliser of ``"mean"``.

    A reduced value gets the first-order bound of the reduced value itself (tighter than the
    sum of the rows' bounds: their errors may cancel to first order), the rounding of every
    row's sums over V, and of the sum over rows (``gamma_N``); the loss adds its two weighted
    terms and rounds.
    """
    o = logits.options
    if o.reduction == "none":
        ce, kl = row_bounds(logits, labels, kl_rows)
    else:
        x_s, x_t = logits.leaves()
        ce_rows, div_rows = loss_rows(x_s, x_t, labels, kl_rows, o)
        m_ce, m_div = row_magnitudes(logits.x_s, logits.x_t, labels, o)
        N, V = x_s.shape
        counted = labels != o.ignore_index
        scale = 1 / denom if o.reduction == "mean" else torch.ones_like(denom)

        def reduced(rows, magnitude, mask):
            arith = row_rounding(rows, *magnitude, V, logits.acc) * mask
            return (first_order_bound(rows.sum() * scale, x_s, x_t, logits) + scale * arith.sum()
                    + gamma(N, logits.acc) * scale * rows.detach().abs().sum()).detach()

        ce, kl = reduced(ce_rows, m_ce, counted), reduced(div_rows, m_div, kl_rows)
    loss = (o.ce_weight * ce + o.kl_coefficient * kl) * (1 + 2 * unit_roundoff(logits.acc))
    return {"loss": loss, "ce": ce, "kl": kl}


def logit_gradient_error(logits: Logits, labels: Tensor, kl_rows: Tensor, ce_scale: Tensor, kl_scale: Tensor,
                         out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(G, A)``, ``[N, V]``: the exact gradient ``G`` of ``sum ce_scale * ce + kl_scale *
    tau^2 * D`` in the student's pre-softcap logits, and a bound ``A`` on the error of the
    computed one, stored in ``out_dtype`` (the dtype of the gradient GEMMs).

    - first order: ``sum_j |dG_v / dz_j| delta_j`` over both models' logits, the Hessian
      rows from double backward (all V columns at once, rows being independent);
    - the row statistics the gradient reads (log-sums, the reverse KL's and JSD's expectations)
      carry their sums' rounding, a relative error of each probability;
    - forming the gradient from them: a few roundings of each of its two terms;
    - storing it in ``out_dtype``.
    """
    o = logits.options
    tau = o.temperature
    x_s, x_t = logits.leaves()
    ce_rows, div_rows = loss_rows(x_s, x_t, labels, kl_rows, o)
    ce_scale, kl_scale = ce_scale.to(x_s.dtype), kl_scale.to(x_s.dtype)
    ce_part = (ce_scale * ce_rows).sum()
    kl_part = (kl_scale * tau**2 * div_rows).sum()
    leaves = [x for x in (x_s, x_t) if x is not None]
    (G,) = torch.autograd.grad(ce_part + kl_part, x_s, create_graph=True)
    N, V = G.shape
    # Column v of every row's Hessian at once: grad of sum_i G[i, v], one v per batch entry.
    picks = torch.zeros(V, N, V, dtype=G.dtype, device=G.device)
    picks[torch.arange(V), :, torch.arange(V)] = 1.0
    hessian = torch.autograd.grad(G, leaves, picks, is_grads_batched=True, retain_graph=True, allow_unused=True)
    with torch.no_grad():
        z_s = transform(logits.x_s, o, "student")
        p_1 = torch.softmax(z_s, -1)
        p_s = p_t = torch.zeros_like(p_1)
        if logits.x_t is not None:
            z_t = transform(logits.x_t, o, "teacher")
            p_s, p_t = torch.softmax(z_s / tau, -1), torch.softmax(z_t / tau, -1)
        # Every Hessian entry d G_v / d z_j carries a factor p_v or p_j; where those underflow
        # to 0 in float64 it is 0, but double backward through 0 log 0 can make it 0 * inf.
        dead = (p_1 == 0) & (p_s == 0) & (p_t == 0)
        dead = dead.T[:, :, None] | dead[None, :, :]
        first = sum((torch.where(dead, 0.0, H.abs()) * e).sum(-1)
                    for H, e in zip(hessian, logits.errors()) if H is not None).T
        first = first * logits.margin()[:, None]

    g_ce = torch.autograd.grad(ce_part, x_s, retain_graph=True)[0].abs()
    g_kl = torch.autograd.grad(kl_part, x_s, retain_graph=True)[0].abs() if kl_part.requires_grad else 0 * g_ce
    with torch.no_grad():
        # The log-sums' rounding is a relative error of every probability; the reverse KL's
        # and JSD's gradients also read a row expectation (aux), rounded like a divergence.
        u_acc, g_sums = unit_roundoff(logits.acc), gamma(sum_terms(V), logits.acc)
        probs = ce_scale.abs()[:, None] * p_1 + (tau * kl_scale.abs())[:, None] * (p_s + p_t)
        A = first.detach() + g_sums * probs + 8 * u_acc * (g_ce + g_kl)
        if o.effective_divergence != "forward_kl":
            _, (sums, after) = row_magnitudes(logits.x_s, logits.x_t, labels, o)
            aux = row_rounding(torch.zeros_like(sums), sums, after, V, logits.acc)
            A = A + (tau * kl_scale.abs() * aux)[:, None] * p_s
        G = G.detach()
        u_out = output_roundoff(out_dtype)
        if u_out:
            A = A + u_out * (G.abs() + A) + underflow(out_dtype)
    return G, A


def gradient_bounds(G: Tensor, A: Tensor, h: Tensor, W: Tensor, has_bias: bool, acc: torch.dtype,
                    partial_sums: int = 1) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Bounds on the leaf gradients ``(dh, dW, db)`` formed from a logit gradient within ``A``
    of ``G`` (:func:`logit_gradient_error`), ``h`` and ``W`` in their own (output) dtype.

    ``dh = dz W`` sums V products, ``dW = dz^T h`` and ``db`` N: each within ``gamma_n`` of its
    absolute products, plus what ``A`` contributes through them, plus the rounding of the
    result to the leaf's dtype. ``partial_sums``: how many times the weight and bias gradients'
    running sums are rounded to that dtype on the way (once per chunk where a chunked path
    keeps them in half precision; 1 otherwise).
    """
    dtype = h.dtype
    u_out, eta = output_roundoff(dtype), underflow(dtype)
    Wa, ha = W.detach().double().abs(), h.detach().double().abs()
    N, V = G.shape
    size = G.abs() + A  # bounds |computed dz|

    def stored(exact: Tensor, err: Tensor) -> Tensor:
        return err + u_out * (exact.abs() + err) + (eta if u_out else 0.0)

    dh = stored(G @ W.detach().double(), A @ Wa + gamma(V, acc) * size @ Wa)
    row_sum = gamma(N, acc) + partial_sums * u_out
    dW = stored(G.T @ h.detach().double(), A.T @ ha + row_sum * size.T @ ha)
    db = stored(G.sum(0), A.sum(0) + row_sum * size.sum(0)) if has_bias else None
    return dh, dW, db


def gradient_rtol(logits: Logits, out_dtype: torch.dtype) -> float:
    """A relative, norm-wise tolerance for gradients where :func:`gradient_bounds`' Hessians
    are too large to form (vocabularies of 10^4 and more).

    A logit error of at most delta changes each probability by a factor within
    ``exp(+-2 delta / tau)``; the logit gradient is made of the student's and the teacher's
    probabilities, so its entries carry twice that relative error, plus roundings of the
    gradient to ``out_dtype``, of the GEMM's result and of the stored value (one ``u`` each,
    with one to spare). Taken relative to a tensor's (or a row's) norm, as the GEMMs that form
    the leaf gradients mix entries of either sign. Unlike the per-entry bounds this is not a
    worst case (a GEMM could amplify a relative error where the gradient cancels); bf16 at
    logits up to ~6 and tau 0.5 gives about 0.2, some 80 times the error of a correct
    computation (tests/kernels/test_rounding.py), far below that of a zero, a sign flip or a
    dropped row.
    """
    delta = max(float(e.max()) for e in logits.errors())
    tau = min(logits.options.temperature, 1.0)
    return 2 * math.expm1(2 * delta / tau) + 4 * unit_roundoff(out_dtype)


# ------------------------------------------------------------------------------ assertions


def _where(diff: Tensor) -> tuple[int, tuple]:
    i = int(diff.flatten().argmax())
    idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), diff.shape)) if diff.dim() else ()
    return i, idx


def assert_within(name: str, got: Tensor, truth: Tensor, bound: Tensor) -> None:
    """``|got - truth| <= bound`` entry by entry (``bound`` broadcasts), ``got`` finite; the
    message names the worst entry relative to its bound."""
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert bool(torch.isfinite(got).all()), f"{name}: non-finite values"
    got, truth = got.detach().double(), truth.detach().double()
    bound = torch.as_tensor(bound, dtype=torch.float64, device=got.device).expand_as(got)
    assert bool(torch.isfinite(bound).all()), f"{name}: the bound itself is not finite"
    diff = (got - truth).abs()
    if diff.numel() and bool((diff > bound).any()):
        i, idx = _where(diff / bound.clamp_min(1e-300))
        raise AssertionError(
            f"{name}: error {float(diff.flatten()[i]):.3g} at {idx} (got {float(got.flatten()[i]):.10g}, "
            f"want {float(truth.flatten()[i]):.10g}) > its rounding bound {float(bound.flatten()[i]):.3g}"
        )


def assert_relative(name: str, got: Tensor, truth: Tensor, rtol: float) -> None:
    """``got`` within ``rtol`` of ``truth`` relative to its scale, where per-entry bounds are
    out of reach (:func:`gradient_rtol`):

    - norm-wise: ``||got - truth|| <= rtol ||truth||``;
    - row by row (the last dimension is a row): ``||got_i - truth_i|| <= rtol (||truth_i|| +
      rms)``, ``rms`` the root mean square of the rows' norms, so that a row left out or
      wrong on its own is caught even where the whole is right;
    - rows that are exactly zero in the truth (positions nothing counts) exactly zero.
    """
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert bool(torch.isfinite(got).all()), f"{name}: non-finite values"
    got, truth = got.detach().double(), truth.detach().double()
    err = got - truth
    scale = float(truth.norm())
    assert float(err.norm()) <= rtol * scale, (
        f"{name}: norm-wise error {float(err.norm()) / max(scale, 1e-300):.3g} of the truth's norm > {rtol:.3g}")
    if truth.dim() == 0:
        return
    rows_t = truth.reshape(-1, truth.shape[-1]).norm(dim=-1) if truth.dim() > 1 else truth.abs()
    rows_e = err.reshape(-1, err.shape[-1]).norm(dim=-1) if err.dim() > 1 else err.abs()
    rms = float(rows_t.square().mean().sqrt())
    over = rows_e - rtol * (rows_t + rms)
    if bool((over > 0).any()):
        i = int(over.argmax())
        raise AssertionError(
            f"{name}: row {i} off by {float(rows_e[i]):.3g} > {rtol:.3g} x (its norm {float(rows_t[i]):.3g} "
            f"+ rms row norm {rms:.3g})")
    zero = rows_t == 0
    assert bool((rows_e[zero] == 0).all()), f"{name}: rows {zero.nonzero()[:, 0].tolist()[:8]} must be exactly 0"

