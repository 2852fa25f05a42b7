"""The loss arithmetic of one logit tile, shared by every Triton kernel.

The fused kernels compute their tiles with ``tl.dot``; the chunked path's epilogue loads them
from a ``[chunk, V]`` logits buffer. Both hand a tile here: ``[BLOCK_N, BLOCK_V]`` logits in
the accumulation dtype ACC, bias added and softcap applied. Keeping the arithmetic in one place
means the two paths cannot drift apart in numerics.

A row's statistics come from an online sweep over its tiles (:func:`sweep_init`, then
:func:`sweep_student` and, with a teacher, :func:`sweep_teacher` per tile, then
:func:`sweep_finish`). Maxima are kept in logit units and differences are taken before
scaling by 1 / tau, so the largest terms carry no rounding from ``|z| / tau``. A row is
summarised by its maxima and the logs of its shifted sums, never by a log-sum-exp: with
logits of 1e4 in float32, ``z - lse`` would carry lse's rounding (~1e-3) into every
probability, where ``(z - m) - log_sum`` is as accurate as torch's log_softmax. The Jensen-Shannon divergence mixes normalised probabilities and needs a second
sweep (:func:`jsd_tile_sums`). :func:`logit_grad` gives ``d loss / d z_s`` of a tile from the
finished statistics.
"""

import triton
import triton.language as tl

from .triton_common import FORWARD_KL, REVERSE_KL, finite_shift, logaddexp


@triton.jit
def sweep_init(BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """``(m, sum_1, sum_s, z_label, m_t, sum_t, weighted)`` before the first tile.

    m, m_t: running maxima of z_s, z_t (the max of z / tau is m / tau: tau > 0);
    sum_1 = sum exp(z_s - m); sum_s = sum exp((z_s - m) / tau); sum_t = sum exp((z_t - m_t) / tau);
    z_label: the label's logit; weighted: forward_kl sum exp((z_t - m_t) / tau) (a_t - a_s),
    reverse_kl sum exp((z_s - m) / tau) (a_s - a_t), with a = z / tau.
    """
    neg_inf = tl.full([BLOCK_N], float("-inf"), ACC)
    zero = tl.zeros([BLOCK_N], ACC)
    return neg_inf, zero, zero, zero, neg_inf, zero, zero


@triton.jit
def sweep_student(
    z_s, cols, col_mask, labels,  # [BLOCK_N, BLOCK_V] student logits, [BLOCK_V] indices and mask, [BLOCK_N] labels
    m, sum_1, sum_s, z_label,  # the student part of the running state, [BLOCK_N] each
    inv_tau,  # ACC scalar
    HAS_TEACHER: tl.constexpr,
):
    """The student's running state after one more tile: ``(m, sum_1, sum_s, z_label, alpha_s, e_s)``.

    ``alpha_s`` (the rescaling of sums at 1 / tau) and ``e_s = exp((z_s - m) / tau)`` are for
    :func:`sweep_teacher`. Callers that compute tiles with ``tl.dot`` run this before the
    teacher's tile, so that for the divergences that do not need it ``z_s`` is dead by then.
    """
    m_new = tl.maximum(m, tl.max(tl.where(col_mask[None, :], z_s, float("-inf")), axis=1))
    shift = finite_shift(m_new)
    shifted = z_s - shift[:, None]
    sum_1 = sum_1 * tl.exp(m - shift) + tl.sum(tl.where(col_mask[None, :], tl.exp(shifted), 0.0), axis=1)
    z_label += tl.sum(tl.where(cols[None, :] == labels[:, None], z_s, 0.0), axis=1)
    alpha_s = sum_s
    e_s = shifted
    if HAS_TEACHER:
        alpha_s = tl.exp((m - shift) * inv_tau)
        e_s = tl.where(col_mask[None, :], tl.exp(shifted * inv_tau), 0.0)
        sum_s = sum_s * alpha_s + tl.sum(e_s, axis=1)
    return m_new, sum_1, sum_s, z_label, alpha_s, e_s


@triton.jit
def sweep_metrics(
    z_s, cols, col_mask, labels,  # one student tile, [BLOCK_V] indices and mask, [BLOCK_N] labels (-1: ignored)
    m, sum_1,  # the student's running max and sum exp(z_s - m) *before* this tile (sweep_student after)
    xs, max_before,  # [BLOCK_N] running sum exp(z_s - m) (z_s - m), max logit before the label's column
):
    """The metrics' running state after one more tile: ``(xs, max_before)``.

    ``xs`` is kept relative to the running maximum, as ``sum_1`` is: when the maximum moves
    from m to m', every old term exp(z - m)(z - m) becomes exp(m - m') exp(z - m)((z - m) +
    (m - m')). The entropy is then ``log sum_1 - xs / sum_1`` (:func:`metrics_finish`) without
    the cancellation of lse - E[z] at large logits.
    """
    m_new = tl.maximum(m, tl.max(tl.where(col_mask[None, :], z_s, float("-inf")), axis=1))
    shift = finite_shift(m_new)
    shifted = z_s - shift[:, None]
    e = tl.where(col_mask[None, :], tl.exp(shifted), 0.0)
    moved = tl.where(m == float("-inf"), 0.0, m - shift)  # no old terms while m is -inf
    xs = tl.exp(m - shift) * (xs + moved * sum_1) + tl.sum(tl.where(e > 0.0, e * shifted, 0.0), axis=1)
    before = col_mask[None, :] & (cols[None, :] < labels[:, None])
    max_before = tl.maximum(max_before, tl.max(tl.where(before, z_s, float("-inf")), axis=1))
    return xs, max_before


@triton.jit
def metrics_finish(m, sum_1, xs, z_label, max_before, labels):
    """``(entropy, top1)`` of finished rows: the entropy at temperature 1 and whether the label
    is the first maximal logit (argmax's pick); 0 / False where the label is ignored."""
    counted = labels >= 0
    entropy = tl.where(counted, tl.log(sum_1) - xs / sum_1, 0.0)
    top1 = counted & (z_label >= m) & (z_label > max_before)
    return entropy, top1


@triton.jit
def sweep_teacher(
    z_s, z_t, col_mask,  # [BLOCK_N, BLOCK_V] logits, [BLOCK_V] column mask
    alpha_s, e_s,  # from sweep_student on this tile
    m_t, sum_t, weighted,  # the teacher part of the running state
    inv_tau,  # ACC scalar
    DIVERGENCE: tl.constexpr,
):
    """The teacher's running state after one more tile: ``(m_t, sum_t, weighted)``."""
    m_t_new = tl.maximum(m_t, tl.max(tl.where(col_mask[None, :], z_t, float("-inf")), axis=1))
    shift_t = finite_shift(m_t_new)
    alpha_t = tl.exp((m_t - shift_t) * inv_tau)
    e_t = tl.where(col_mask[None, :], tl.exp((z_t - shift_t[:, None]) * inv_tau), 0.0)
    sum_t = sum_t * alpha_t + tl.sum(e_t, axis=1)
    # Weights of 0 give exactly 0 (0 log 0 = 0), also where both logits are -inf.
    if DIVERGENCE == FORWARD_KL:
        weighted = weighted * alpha_t + tl.sum(tl.where(e_t > 0.0, e_t * ((z_t - z_s) * inv_tau), 0.0), axis=1)
    elif DIVERGENCE == REVERSE_KL:
        weighted = weighted * alpha_s + tl.sum(tl.where(e_s > 0.0, e_s * ((z_s - z_t) * inv_tau), 0.0), axis=1)
    return m_t_new, sum_t, weighted


@triton.jit
def sweep_finish(
    m, sum_1, sum_s, z_label, m_t, sum_t, weighted,  # the state after the last tile
    labels, inv_tau,
    HAS_TEACHER: tl.constexpr, DIVERGENCE: tl.constexpr,
):
    """``(log_sum_1, ce, log_sum_s, log_sum_t, div, aux)``, ``[BLOCK_N]`` each, from a finished
    sweep: with the maxima ``m``, ``m_t`` they are a row's statistics (lse = m + log_sum_1,
    lse_s = m / tau + log_sum_s, lse_t = m_t / tau + log_sum_t).

    ``ce`` is 0 where the label is ignored; ``div`` is unmasked and, for JSD, not computed
    here (0: it needs :func:`jsd_tile_sums`). ``aux`` is what the gradient needs besides the
    statistics: reverse_kl E_ps[a_s - a_t] (subtracting lses of size |z| / tau would leave
    eps |z| / tau per element), 0 otherwise. Without a teacher all but log_sum_1 and ce are 0.
    """
    log_sum_1 = tl.log(sum_1)
    ce = tl.where(labels >= 0, (m - z_label) + log_sum_1, 0.0)
    zero = tl.zeros(log_sum_1.shape, log_sum_1.dtype)
    log_sum_s = zero
    log_sum_t = zero
    div = zero
    aux = zero
    if HAS_TEACHER:
        log_sum_s = tl.log(sum_s)
        log_sum_t = tl.log(sum_t)
        lse_s_minus_lse_t = (m - m_t) * inv_tau + (log_sum_s - log_sum_t)
        if DIVERGENCE == FORWARD_KL:
            div = weighted / sum_t + lse_s_minus_lse_t
        elif DIVERGENCE == REVERSE_KL:
            aux = weighted / sum_s
            div = aux - lse_s_minus_lse_t
    return log_sum_1, ce, log_sum_s, log_sum_t, div, aux


@triton.jit
def jsd_tile_sums(
    z_s, z_t, col_mask,  # one tile of both logits, [BLOCK_V] column mask
    m, m_t, log_sum_s, log_sum_t,  # [BLOCK_N]: maxima and log of sum_s / sum_t of the first sweep
    inv_tau, log_beta, log_1m_beta,  # ACC scalars
):
    """This tile's share of ``(KL(p_t || m), KL(p_s || m))``, ``m = beta p_t + (1 - beta) p_s``."""
    logp_s = (z_s - m[:, None]) * inv_tau - log_sum_s[:, None]
    logp_t = (z_t - m_t[:, None]) * inv_tau - log_sum_t[:, None]
    # log m in log space: beta = 0 or 1 makes one side -inf, and the exact 0 follows.
    log_m = logaddexp(logp_t + log_beta, logp_s + log_1m_beta)
    p_t = tl.exp(logp_t)
    p_s = tl.exp(logp_s)
    kl_t = tl.sum(tl.where(col_mask[None, :] & (p_t > 0.0), p_t * (logp_t - log_m), 0.0), axis=1)
    kl_s = tl.sum(tl.where(col_mask[None, :] & (p_s > 0.0), p_s * (logp_s - log_m), 0.0), axis=1)
    return kl_t, kl_s


@triton.jit
def jsd_from_sums(kl_t, kl_s, beta):
    """``(div, aux)`` of the JSD from its second sweep's sums: beta KL(p_t || m) +
    (1 - beta) KL(p_s || m), and KL(p_s || m), which the gradient needs."""
    return beta * kl_t + (1.0 - beta) * kl_s, kl_s


@triton.jit
def masked_divergence(div, kl_mask_ptr, rows, row_mask):
    """``div`` where the row carries the divergence (``kl_mask``), 0 elsewhere."""
    kl_mask = tl.load(kl_mask_ptr + rows, mask=row_mask, other=0)
    return tl.where(kl_mask != 0, div, 0.0)


@triton.jit
def logit_grad(
    z_s, z_t,  # [BLOCK_N, BLOCK_V] logits (z_t unused without a teacher)
    cols, labels,  # [BLOCK_V] vocabulary indices, [BLOCK_N] labels (-1: ignored)
    m, log_sum_1, log_sum_s, m_t, log_sum_t,  # [BLOCK_N] statistics (sweep_finish)
    aux, ce_scale, kl_scale,  # [BLOCK_N] and the gradient scales
    inv_tau, inv_softcap, log_beta, log_1m_beta, one_m_beta,  # ACC scalars
    HAS_TEACHER: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DIVERGENCE: tl.constexpr,
):
    """``d loss / d z_s`` of one tile, unmasked::

        dz = ce_scale * (softmax(z_s) - onehot(y)) + kl_scale * tau * dD/d(z_s / tau)   [* (1 - (z_s/c)^2)]

    where ``z_s`` is the softcapped logit c tanh(x / c) and the last factor its derivative.
    """
    shifted = z_s - m[:, None]  # exact near the maximum, where it matters
    p_1 = tl.exp(shifted - log_sum_1[:, None])
    dz = ce_scale[:, None] * (p_1 - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0))
    if HAS_TEACHER:
        logp_s = shifted * inv_tau - log_sum_s[:, None]
        p_s = tl.exp(logp_s)
        logp_t = (z_t - m_t[:, None]) * inv_tau - log_sum_t[:, None]
        # grad: d D / d(z_s / tau), the softmax Jacobian applied to d D / d p_s.
        if DIVERGENCE == FORWARD_KL:
            grad = p_s - tl.exp(logp_t)
        elif DIVERGENCE == REVERSE_KL:
            # p_s (log p_s - log p_t - KL) with the lses cancelled exactly: aux = E_ps[a_s - a_t].
            grad = tl.where(p_s > 0.0, p_s * ((z_s * inv_tau - z_t * inv_tau) - aux[:, None]), 0.0)
        else:
            log_m = logaddexp(logp_t + log_beta, logp_s + log_1m_beta)
            grad = tl.where(p_s > 0.0, one_m_beta * p_s * (logp_s - log_m - aux[:, None]), 0.0)
        # d/dz = (1 / tau) d/da and the loss weighs D by tau^2: kl_scale * tau in all. A row
        # without the divergence gets none of it, even if its teacher logits are NaN.
        dz += tl.where((kl_scale != 0.0)[:, None], (kl_scale / inv_tau)[:, None] * grad, 0.0)
    if HAS_SOFTCAP:
        dz *= 1.0 - (z_s * inv_softcap) * (z_s * inv_softcap)
    return dz
