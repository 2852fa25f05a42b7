"""Forward Triton kernel: per-token log-sum-exps, cross-entropy and teacher divergence.

One program owns ``BLOCK_N`` tokens and sweeps the vocabulary in ``BLOCK_V`` tiles, recomputing
the student (and teacher) logit tile with ``tl.dot`` over ``BLOCK_D`` chunks of the hidden size.
Running maxima and rescaled sums give every statistic in that single sweep; the Jensen-Shannon
divergence needs the final log-sum-exps and so sweeps a second time. Nothing of size
``[N, V]`` is ever stored: the outputs are ``[N]`` vectors.

In plain torch, with ``z_s = softcap(h @ W.T + b)`` and ``z_t = softcap(ht @ Wt.T + bt)``::

    m, m_t = z_s.max(-1).values, z_t.max(-1).values
    log_sum_1 = (z_s - m[:, None]).logsumexp(-1)                  # lse = m + log_sum_1
    log_sum_s, log_sum_t = ((z_s - m[:, None]) / tau).logsumexp(-1), ((z_t - m_t[:, None]) / tau).logsumexp(-1)
    ce_rows = (m + log_sum_1 - z_s.gather(-1, y[:, None])[:, 0]) * (y != ignore_index)
    div_rows = D(softmax(z_t / tau), softmax(z_s / tau)) * kl_mask
"""

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .options import LossOptions
from .reduction import accumulation_dtype
from .triton_common import (
    INTERPRET,
    JSD,
    KernelConfig,
    dot_flags,
    load_labels,
    logits_tile,
    loss_flags,
    loss_scalars,
    on_device,
    presence_flags,
    scalar_args,
    sizes_aligned,
    tile_dtype,
)
from .triton_math import (
    jsd_from_sums,
    jsd_tile_sums,
    masked_divergence,
    metrics_finish,
    sweep_finish,
    sweep_init,
    sweep_metrics,
    sweep_student,
    sweep_teacher,
)

# One config per operand width, no autotuning (python -m sdft_kernels.triton_compile_check
# shows both compile for sm_80 and sm_90 without register spills). The weight stream, read
# N / BLOCK_N times, depends on BLOCK_N only; [64, 64] tiles leave 8 warps room for both logit
# tiles and their exponentials. float32 GEMMs without TF32 run on FMAs, whose operand slices
# live in registers: their tiles are smaller.
FORWARD_CONFIG = KernelConfig(block_n=64, block_v=64, block_d=64, num_warps=8, num_stages=2)
# One stage: with two, ptxas under triton 3.6 (make compile-check-triton) spilled the
# float32 JSD variant on sm_90 (128 registers, 40 B spilled; triton 3.9 did not).
FORWARD_CONFIG_FP32 = KernelConfig(block_n=32, block_v=64, block_d=32, num_warps=8, num_stages=1)
# With the metrics' running sums, eight warps spilled the float32 CE-only variant on sm_80 (12 B,
# at 80 registers); four warps on [32, 32] tiles compile every variant without spills.
FORWARD_CONFIG_FP32_METRICS = KernelConfig(block_n=32, block_v=32, block_d=32, num_warps=4, num_stages=1)
# Half precision with sizes or strides that are not multiples of 16 (D = 2100, V = 50257):
# the [64, 64] tiles spilled on sm_80 (84 B), and the float32 ones under triton 3.6 (8 B).
FORWARD_CONFIG_UNALIGNED = KernelConfig(block_n=32, block_v=64, block_d=16, num_warps=8, num_stages=1)
# The interpreter runs programs one after another: few, large tiles are fastest there.
FORWARD_CONFIG_INTERPRET = KernelConfig(block_n=64, block_v=128, block_d=64, num_warps=1, num_stages=1)


class ForwardStats(NamedTuple):
    """Per-token statistics of the forward pass, all ``[N]`` float32 (float64 for float64 inputs).

    ``m``/``m_t``: student/teacher maximum logit; ``log_sum_1``: log sum exp(z_s - m), so the
    student's log-sum-exp is m + log_sum_1; ``log_sum_s``/``log_sum_t``: log sum exp((z - m) /
    tau) of student and teacher (kept apart from the maxima: see :mod:`triton_math`);
    ``ce_rows``: cross-entropy, 0 where the label is ignored; ``div_rows``: the divergence, 0
    outside ``kl_mask``; ``div_aux``: what the backward needs besides them (reverse_kl:
    E_ps[z_s/tau - z_t/tau]; jsd: KL(p_s||m); both unmasked; forward_kl: 0).
    Without a teacher ``m_t``, ``log_sum_s``, ``log_sum_t``, ``div_rows`` and ``div_aux`` are
    zeros. With ``options.metrics``: ``entropy`` (the student's at temperature 1) and ``top1``
    (bool: the label is its first maximal logit), 0 / False where the label is ignored; else
    None.
    """

    m: Tensor
    log_sum_1: Tensor
    log_sum_s: Tensor
    m_t: Tensor
    log_sum_t: Tensor
    ce_rows: Tensor
    div_rows: Tensor
    div_aux: Tensor
    entropy: Optional[Tensor] = None
    top1: Optional[Tensor] = None


@presence_flags(HAS_BIAS="b_ptr", HAS_TEACHER="ht_ptr", HAS_TEACHER_BIAS="bt_ptr", METRICS="entropy_ptr")
@triton.jit
def sdft_forward_kernel(
    h_ptr, w_ptr, b_ptr,  # student hidden [N, D], weight [V, D], bias [V] or None
    ht_ptr, wt_ptr, bt_ptr,  # teacher hidden [N, DT], weight [V, DT], bias [V]; None without a teacher
    labels_ptr, kl_mask_ptr,  # [N] int64, [N] uint8
    m_ptr, log_sum_1_ptr, log_sum_s_ptr, m_t_ptr, log_sum_t_ptr, ce_ptr, div_ptr, aux_ptr,  # outputs, [N] ACC
    entropy_ptr, top1_ptr,  # [N] ACC and uint8 metric outputs; None: not wanted
    N, V, D, DT,  # sizes
    stride_h, stride_w, stride_ht, stride_wt,  # row strides in elements (columns are contiguous)
    ignore_index,  # label of positions without cross-entropy
    inv_tau: tl.float64, softcap: tl.float64, teacher_softcap: tl.float64,  # 1 / tau; softcaps (unused without HAS_*)
    logit_scale: tl.float64, teacher_logit_scale: tl.float64,  # each model's logit scale
    log_beta: tl.float64, log_1m_beta: tl.float64, beta: tl.float64,  # JSD mixture weights
    HAS_BIAS: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_TEACHER_SOFTCAP: tl.constexpr, OWN_TEACHER_SOFTCAP: tl.constexpr,  # softcaps
    HAS_LOGIT_SCALE: tl.constexpr, HAS_TEACHER_LOGIT_SCALE: tl.constexpr,  # logit scales other than 1
    DIVERGENCE: tl.constexpr,  # FORWARD_KL/REVERSE_KL/JSD
    DOT_DTYPE: tl.constexpr, TEACHER_DOT_DTYPE: tl.constexpr, ACC: tl.constexpr,  # tile dtypes
    PRECISION: tl.constexpr, ROUND_LOGITS: tl.constexpr,  # tl.dot input precision ("ieee"/"tf32"); round logits
    METRICS: tl.constexpr,  # store the student's entropy and top-1 per row
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    h_offsets = rows.to(tl.int64) * stride_h
    ht_offsets = rows.to(tl.int64) * stride_ht
    labels = load_labels(labels_ptr, rows, row_mask, ignore_index)
    (inv_tau, softcap, inv_softcap, teacher_softcap, teacher_inv_softcap, logit_scale, teacher_logit_scale,
     log_beta, log_1m_beta, beta) = loss_scalars(inv_tau, softcap, teacher_softcap, logit_scale,
                                                 teacher_logit_scale, log_beta, log_1m_beta, beta,
                                                 OWN_TEACHER_SOFTCAP, ACC)

    m, sum_1, sum_s, z_label, m_t, sum_t, weighted = sweep_init(BLOCK_N, ACC)
    xs = tl.zeros([BLOCK_N], ACC)  # the metrics' state (sweep_metrics); unused without METRICS
    max_before = tl.full([BLOCK_N], float("-inf"), ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z_s = logits_tile(
            h_ptr, w_ptr, b_ptr, h_offsets, cols.to(tl.int64) * stride_w, row_mask, col_mask, cols, D,
            logit_scale, softcap, inv_softcap, HAS_BIAS, HAS_LOGIT_SCALE, HAS_SOFTCAP, DOT_DTYPE, ACC, PRECISION,
            ROUND_LOGITS,
            BLOCK_N, BLOCK_V, BLOCK_D,
        )
        if METRICS:
            xs, max_before = sweep_metrics(z_s, cols, col_mask, labels, m, sum_1, xs, max_before)
        m_new, sum_1, sum_s, z_label, alpha_s, e_s = sweep_student(
            z_s, cols, col_mask, labels, m, sum_1, sum_s, z_label, inv_tau, HAS_TEACHER,
        )
        if HAS_TEACHER:
            z_t = logits_tile(
                ht_ptr, wt_ptr, bt_ptr, ht_offsets, cols.to(tl.int64) * stride_wt, row_mask, col_mask, cols, DT,
                teacher_logit_scale, teacher_softcap, teacher_inv_softcap, HAS_TEACHER_BIAS,
                HAS_TEACHER_LOGIT_SCALE, HAS_TEACHER_SOFTCAP,
                TEACHER_DOT_DTYPE, ACC, PRECISION, ROUND_LOGITS, BLOCK_N, BLOCK_V, BLOCK_D,
            )
            m_t, sum_t, weighted = sweep_teacher(
                z_s, z_t, col_mask, alpha_s, e_s, m_t, sum_t, weighted, inv_tau, DIVERGENCE,
            )
        m = m_new
    log_sum_1, ce, log_sum_s, log_sum_t, div, aux = sweep_finish(
        m, sum_1, sum_s, z_label, m_t, sum_t, weighted, labels, inv_tau, HAS_TEACHER, DIVERGENCE,
    )
    tl.store(m_ptr + rows, m, mask=row_mask)
    tl.store(log_sum_1_ptr + rows, log_sum_1, mask=row_mask)
    tl.store(ce_ptr + rows, ce, mask=row_mask)
    if METRICS:
        entropy, top1 = metrics_finish(m, sum_1, xs, z_label, max_before, labels)
        tl.store(entropy_ptr + rows, entropy, mask=row_mask)
        tl.store(top1_ptr + rows, top1.to(tl.uint8), mask=row_mask)
    if not HAS_TEACHER:
        m_t = tl.zeros([BLOCK_N], ACC)
    if HAS_TEACHER:
        if DIVERGENCE == JSD:
            # m = beta p_t + (1 - beta) p_s mixes normalised probabilities, so it needs the
            # finished statistics: a second sweep accumulates KL(p_t||m) and KL(p_s||m).
            kl_t = tl.zeros([BLOCK_N], ACC)
            kl_s = tl.zeros([BLOCK_N], ACC)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                col_mask = cols < V
                z_s = logits_tile(
                    h_ptr, w_ptr, b_ptr, h_offsets, cols.to(tl.int64) * stride_w, row_mask, col_mask, cols, D,
                    logit_scale, softcap, inv_softcap, HAS_BIAS, HAS_LOGIT_SCALE, HAS_SOFTCAP, DOT_DTYPE, ACC,
                    PRECISION, ROUND_LOGITS,
                    BLOCK_N, BLOCK_V, BLOCK_D,
                )
                z_t = logits_tile(
                    ht_ptr, wt_ptr, bt_ptr, ht_offsets, cols.to(tl.int64) * stride_wt, row_mask, col_mask, cols, DT,
                    teacher_logit_scale, teacher_softcap, teacher_inv_softcap, HAS_TEACHER_BIAS,
                    HAS_TEACHER_LOGIT_SCALE, HAS_TEACHER_SOFTCAP,
                    TEACHER_DOT_DTYPE, ACC, PRECISION, ROUND_LOGITS, BLOCK_N, BLOCK_V, BLOCK_D,
                )
                part_t, part_s = jsd_tile_sums(
                    z_s, z_t, col_mask, m, m_t, log_sum_s, log_sum_t, inv_tau, log_beta, log_1m_beta,
                )
                kl_t += part_t
                kl_s += part_s
            div, aux = jsd_from_sums(kl_t, kl_s, beta)
        div = masked_divergence(div, kl_mask_ptr, rows, row_mask)
    tl.store(log_sum_s_ptr + rows, log_sum_s, mask=row_mask)
    tl.store(m_t_ptr + rows, m_t, mask=row_mask)
    tl.store(log_sum_t_ptr + rows, log_sum_t, mask=row_mask)
    tl.store(div_ptr + rows, div, mask=row_mask)
    tl.store(aux_ptr + rows, aux, mask=row_mask)


def default_forward_config(dtype: torch.dtype, aligned: bool = True, metrics: bool = False) -> KernelConfig:
    """The forward kernel's tiles for tiles of ``dtype`` (:func:`tile_dtype`) in this process
    (GPU or interpreter); ``aligned``: :func:`sizes_aligned` of the launch; ``metrics``: the
    launch stores the student's metrics."""
    if INTERPRET:
        return FORWARD_CONFIG_INTERPRET
    if dtype.itemsize == 2:
        return FORWARD_CONFIG if aligned else FORWARD_CONFIG_UNALIGNED
    return FORWARD_CONFIG_FP32_METRICS if metrics else FORWARD_CONFIG_FP32


def sdft_forward(
    h: Tensor,
    W: Tensor,
    b: Optional[Tensor],
    ht: Optional[Tensor],
    Wt: Optional[Tensor],
    bt: Optional[Tensor],
    labels: Tensor,
    kl_mask: Tensor,
    options: LossOptions,
    *,
    config: Optional[KernelConfig] = None,
) -> ForwardStats:
    """Per-token statistics of the SDFT loss without materialising logits.

    Shapes: ``h [N, D]``, ``W [V, D]``, ``b [V]``, ``ht [N, Dt]``, ``Wt [V, Dt]``, ``bt [V]``,
    ``labels [N]`` int64, ``kl_mask [N]`` bool; all contiguous. ``ht``/``Wt`` None means no
    teacher (``bt`` must then be None). Returns :class:`ForwardStats`, float32 (float64 for
    float64 ``h``), with the metrics when ``options.metrics``. ``config`` overrides the tile
    sizes (tests use small tiles).
    """
    N, D = h.shape
    V = W.shape[0]
    acc = accumulation_dtype(h.dtype)
    core = [torch.empty(N, device=h.device, dtype=acc) for _ in ForwardStats._fields[:8]]
    metrics = ((torch.empty(N, device=h.device, dtype=acc), torch.empty(N, device=h.device, dtype=torch.bool))
               if options.metrics else (None, None))
    stats = ForwardStats(*core, *metrics)
    if N == 0:
        return stats
    has_teacher = ht is not None
    aligned = sizes_aligned(V, D, h.stride(0), W.stride(0), *((ht.shape[1], ht.stride(0), Wt.stride(0)) if has_teacher else ()))
    config = config or default_forward_config(tile_dtype(h.dtype, None if ht is None else ht.dtype), aligned,
                                              options.metrics)
    grid = (triton.cdiv(N, config.block_n),)
    with on_device(h):  # the tensors' device, not the current one
        sdft_forward_kernel[grid](
            h, W, b, ht, Wt, bt, labels, kl_mask.view(torch.uint8), *core,
            metrics[0], None if metrics[1] is None else metrics[1].view(torch.uint8),
            N, V, D, ht.shape[1] if has_teacher else 0,
            h.stride(0), W.stride(0), ht.stride(0) if has_teacher else 0, Wt.stride(0) if has_teacher else 0,
            *scalar_args(options), **loss_flags(options), **dot_flags(h, ht, Wt, options),
            BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_D=config.block_d,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return stats
