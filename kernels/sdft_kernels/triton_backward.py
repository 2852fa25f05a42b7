"""Backward Triton kernels: gradients of hidden states, weight and bias from per-token scales.

The gradient of the loss with respect to the student logits (``triton_math.logit_grad``) is
never stored: two kernels recompute it tile by tile from the forward statistics.

* ``sdft_backward_hidden_kernel``: one program per ``BLOCK_N`` tokens sweeps the vocabulary and
  accumulates ``dh[rows] += dz @ W[cols]`` chunk by chunk of D in its own rows.
* ``sdft_backward_weight_kernel``: one program per ``BLOCK_V`` vocabulary entries sweeps the
  tokens and accumulates ``dW[cols] += dz^T @ h[rows]`` and ``db[cols] += dz.sum(0)``.

Every output element has one owner program and is summed in a fixed order: no atomics, and
the result is bitwise reproducible. (The two kernels share their per-tile gradient, their row
loads and one launcher, and their configs were chosen together against register spills: they
stay in one file of about 350 lines rather than two that must change in step.) A program's partial sums live in the output itself (or in
a float32 buffer of the same shape for half-precision outputs): the tile is read, updated and
written back once per sweep step, and the last step writes the output dtype.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .options import LossOptions
from .reduction import accumulation_dtype
from .triton_common import (
    INTERPRET,
    KernelConfig,
    dot_flags,
    extra_transforms,
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
from .triton_forward import ForwardStats
from .triton_math import logit_grad

# One config per kernel and operand width, no autotuning (python -m
# sdft_kernels.triton_compile_check: no register spills on sm_80 and sm_90). The hidden kernel
# rereads and rewrites its dh rows once per vocabulary tile, the weight kernel its dW rows once
# per token tile, so a wide BLOCK_V (resp. BLOCK_N) divides that traffic; but the teacher
# tile, the student tile and the gradient tile are live at once, and [64, 128] tiles spill on
# sm_80, so the hidden kernel stays at [64, 64]. float32 without TF32 runs on FMAs, whose
# operand slices live in registers: smaller tiles.
BACKWARD_HIDDEN_CONFIG = KernelConfig(block_n=64, block_v=64, block_d=32, num_warps=8, num_stages=2)
# block_d 16: at 32 the bf16 JSD variant spilled 8 B on sm_80 once uncounted rows were masked.
BACKWARD_WEIGHT_CONFIG = KernelConfig(block_n=128, block_v=64, block_d=16, num_warps=8, num_stages=2)
# float32 tiles: [32, 64] (eight warps) spilled on sm_80 for unaligned sizes (56 B), for a
# float32 teacher of a bfloat16 student (triton 3.6, 8 B), or, at 80 registers, a few bytes
# for CE alone. [32, 32] on four warps compiles every aligned variant, mixed teacher included,
# under triton 3.6 and 3.9 without spills; unaligned sizes and float64 have their own (each
# the first that compiled without spills for all its variants under both):
BACKWARD_HIDDEN_CONFIG_FP32 = KernelConfig(block_n=32, block_v=32, block_d=16, num_warps=4, num_stages=2)
BACKWARD_HIDDEN_CONFIG_FP32_UNALIGNED = KernelConfig(block_n=16, block_v=64, block_d=16, num_warps=8, num_stages=2)
BACKWARD_HIDDEN_CONFIG_FP64 = KernelConfig(block_n=16, block_v=16, block_d=16, num_warps=4, num_stages=1)
# A teacher of another family (its own softcap, logit scales) takes registers for its scalars:
# with two stages ptxas held the float32 variant to 128 registers and spilled on sm_80 (36 B,
# unaligned 24 B); one stage compiles both without spills.
BACKWARD_HIDDEN_CONFIG_FP32_TRANSFORMS = KernelConfig(block_n=32, block_v=32, block_d=16, num_warps=4, num_stages=1)
# One stage: with two, ptxas spilled the reverse_kl variant on sm_80 (79 registers, 32 B spilled).
# Four warps: with eight, ptxas held each thread to 128 registers and spilled the softcap
# variant on sm_80 for a float32 teacher of a bfloat16 student and for unaligned float32
# sizes (8 B), and with block_d 16 the float32 softcap variant on sm_90 (24 B).
BACKWARD_WEIGHT_CONFIG_FP32 = KernelConfig(block_n=32, block_v=64, block_d=32, num_warps=4, num_stages=1)
# float64 needs twice the registers per element: with four warps it spilled, with eight not.
BACKWARD_WEIGHT_CONFIG_FP64 = KernelConfig(block_n=32, block_v=64, block_d=32, num_warps=8, num_stages=1)
BACKWARD_CONFIG_INTERPRET = KernelConfig(block_n=64, block_v=128, block_d=64, num_warps=1, num_stages=1)


@triton.jit
def logits_grad_tile(
    h_ptr, w_ptr, b_ptr, ht_ptr, wt_ptr, bt_ptr,  # student and teacher hidden, weight, bias
    labels, m, log_sum_1, log_sum_s, m_t, log_sum_t, aux, ce_scale, kl_scale,  # [BLOCK_N] per-token values
    rows, cols, row_mask, col_mask,  # [BLOCK_N], [BLOCK_V] indices and masks
    D, DT,  # hidden sizes
    stride_h, stride_w, stride_ht, stride_wt,  # row strides
    inv_tau, softcap, inv_softcap, log_beta, log_1m_beta, one_m_beta,  # ACC scalars
    teacher_softcap, teacher_inv_softcap, logit_scale, teacher_logit_scale,  # ACC scalars
    HAS_BIAS: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_TEACHER_SOFTCAP: tl.constexpr, HAS_LOGIT_SCALE: tl.constexpr,
    HAS_TEACHER_LOGIT_SCALE: tl.constexpr, DIVERGENCE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, TEACHER_DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    ROUND_LOGITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``d loss / d z_s`` (:func:`logit_grad`) for one ``[BLOCK_N, BLOCK_V]`` tile in ACC, zero
    outside the masks."""
    # The teacher tile comes first: then only it stays live while the student tile
    # accumulates, not the student tile and a partial dz during the teacher's GEMM.
    z_t = tl.zeros([BLOCK_N, BLOCK_V], ACC)
    if HAS_TEACHER:
        z_t = logits_tile(
            ht_ptr, wt_ptr, bt_ptr, rows.to(tl.int64) * stride_ht, cols.to(tl.int64) * stride_wt, row_mask,
            col_mask, cols, DT, teacher_logit_scale, teacher_softcap, teacher_inv_softcap, HAS_TEACHER_BIAS,
            HAS_TEACHER_LOGIT_SCALE,
            HAS_TEACHER_SOFTCAP, TEACHER_DOT_DTYPE, ACC, PRECISION, ROUND_LOGITS, BLOCK_N, BLOCK_V, BLOCK_D,
        )
    z_s = logits_tile(
        h_ptr, w_ptr, b_ptr, rows.to(tl.int64) * stride_h, cols.to(tl.int64) * stride_w, row_mask, col_mask,
        cols, D, logit_scale, softcap, inv_softcap, HAS_BIAS, HAS_LOGIT_SCALE, HAS_SOFTCAP, DOT_DTYPE, ACC,
        PRECISION, ROUND_LOGITS,
        BLOCK_N, BLOCK_V, BLOCK_D,
    )
    dz = logit_grad(
        z_s, z_t, cols, labels, m, log_sum_1, log_sum_s, m_t, log_sum_t, aux, ce_scale, kl_scale,
        inv_tau, inv_softcap, log_beta, log_1m_beta, one_m_beta, HAS_TEACHER, HAS_SOFTCAP, DIVERGENCE,
    )
    return tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)


@triton.jit
def load_row_stats(
    rows, N,  # [BLOCK_N] token indices, token count
    labels_ptr, m_ptr, log_sum_1_ptr, log_sum_s_ptr, m_t_ptr, log_sum_t_ptr, aux_ptr,  # [N] statistics
    ce_scale_ptr, kl_scale_ptr,  # [N] gradient scales
    ignore_index, ACC: tl.constexpr,
):
    """Per-token inputs of the gradient for one token block.

    Returns ``(in_range, active, labels, m, log_sum_1, log_sum_s, m_t, log_sum_t, aux, ce_scale,
    kl_scale)``; ignored
    labels become -1 (never a column, even when ignore_index lies in [0, V)). ``active`` rows
    count for some term: the others are never loaded, so a NaN there reaches no gradient.
    """
    in_range = rows < N
    labels = load_labels(labels_ptr, rows, in_range, ignore_index)
    m = tl.load(m_ptr + rows, mask=in_range, other=0.0)
    log_sum_1 = tl.load(log_sum_1_ptr + rows, mask=in_range, other=0.0)
    log_sum_s = tl.load(log_sum_s_ptr + rows, mask=in_range, other=0.0)
    m_t = tl.load(m_t_ptr + rows, mask=in_range, other=0.0)
    log_sum_t = tl.load(log_sum_t_ptr + rows, mask=in_range, other=0.0)
    aux = tl.load(aux_ptr + rows, mask=in_range, other=0.0)
    ce_scale = tl.load(ce_scale_ptr + rows, mask=in_range, other=0.0).to(ACC)
    kl_scale = tl.load(kl_scale_ptr + rows, mask=in_range, other=0.0).to(ACC)
    active = in_range & ((ce_scale != 0.0) | (kl_scale != 0.0))
    return in_range, active, labels, m, log_sum_1, log_sum_s, m_t, log_sum_t, aux, ce_scale, kl_scale


@presence_flags(HAS_BIAS="b_ptr", HAS_TEACHER="ht_ptr", HAS_TEACHER_BIAS="bt_ptr")
@triton.jit
def sdft_backward_hidden_kernel(
    h_ptr, w_ptr, b_ptr,  # student hidden [N, D], weight [V, D], bias [V] or None
    ht_ptr, wt_ptr, bt_ptr,  # teacher hidden [N, DT], weight [V, DT], bias [V]; None without a teacher
    labels_ptr, m_ptr, log_sum_1_ptr, log_sum_s_ptr, m_t_ptr, log_sum_t_ptr, aux_ptr,  # [N] forward statistics
    ce_scale_ptr, kl_scale_ptr,  # [N] gradient scales
    dh_acc_ptr, dh_ptr,  # [N, D] ACC partial sums (may alias dh), [N, D] gradient in h's dtype
    N, V, D, DT,  # sizes
    stride_h, stride_w, stride_ht, stride_wt, stride_dh,  # row strides in elements
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
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, active, labels, m, log_sum_1, log_sum_s, m_t, log_sum_t, aux, ce_scale, kl_scale = load_row_stats(
        rows, N, labels_ptr, m_ptr, log_sum_1_ptr, log_sum_s_ptr, m_t_ptr, log_sum_t_ptr, aux_ptr,
        ce_scale_ptr, kl_scale_ptr, ignore_index, ACC,
    )
    (inv_tau, softcap, inv_softcap, teacher_softcap, teacher_inv_softcap, logit_scale, teacher_logit_scale,
     log_beta, log_1m_beta, beta) = loss_scalars(inv_tau, softcap, teacher_softcap, logit_scale,
                                                 teacher_logit_scale, log_beta, log_1m_beta, beta,
                                                 OWN_TEACHER_SOFTCAP, ACC)
    one_m_beta = 1.0 - beta
    dh_offsets = rows.to(tl.int64) * stride_dh

    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        dz = logits_grad_tile(
            h_ptr, w_ptr, b_ptr, ht_ptr, wt_ptr, bt_ptr,
            labels, m, log_sum_1, log_sum_s, m_t, log_sum_t, aux, ce_scale, kl_scale, rows, cols, active, col_mask,
            D, DT, stride_h, stride_w, stride_ht, stride_wt,
            inv_tau, softcap, inv_softcap, log_beta, log_1m_beta, one_m_beta,
            teacher_softcap, teacher_inv_softcap, logit_scale, teacher_logit_scale,
            HAS_BIAS, HAS_TEACHER, HAS_TEACHER_BIAS, HAS_SOFTCAP, HAS_TEACHER_SOFTCAP, HAS_LOGIT_SCALE,
            HAS_TEACHER_LOGIT_SCALE, DIVERGENCE,
            DOT_DTYPE, TEACHER_DOT_DTYPE, ACC, PRECISION, ROUND_LOGITS, BLOCK_N, BLOCK_V, BLOCK_D,
        ).to(DOT_DTYPE)
        # The first step starts the sums from zero, the last one writes the output dtype. (The
        # flags are row vectors: the interpreter mishandles a scalar mask & a tensor mask.)
        step = tl.zeros([BLOCK_N], tl.int32) + v0
        rows_read = row_mask & (step > 0)
        rows_partial = row_mask & (step + BLOCK_V < V)
        rows_final = row_mask & (step + BLOCK_V >= V)
        w_offsets = cols.to(tl.int64) * stride_w
        # The previous step wrote these dh rows with possibly another thread-to-element map
        # than the loads below use: the barrier makes those writes visible across the block.
        tl.debug_barrier()
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_mask = d < D
            w = tl.load(w_ptr + w_offsets[:, None] + d[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            offsets = dh_offsets[:, None] + d[None, :]
            acc = tl.load(dh_acc_ptr + offsets, mask=rows_read[:, None] & d_mask[None, :], other=0.0)
            acc = tl.dot(dz, w.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC)
            tl.store(dh_acc_ptr + offsets, acc, mask=rows_partial[:, None] & d_mask[None, :])
            tl.store(dh_ptr + offsets, acc.to(dh_ptr.dtype.element_ty), mask=rows_final[:, None] & d_mask[None, :])


@presence_flags(HAS_BIAS="b_ptr", HAS_TEACHER="ht_ptr", HAS_TEACHER_BIAS="bt_ptr", COMPUTE_DW="dw_ptr",
                COMPUTE_DB="db_ptr")
@triton.jit
def sdft_backward_weight_kernel(
    h_ptr, w_ptr, b_ptr,  # student hidden [N, D], weight [V, D], bias [V] or None
    ht_ptr, wt_ptr, bt_ptr,  # teacher hidden [N, DT], weight [V, DT], bias [V]; None without a teacher
    labels_ptr, m_ptr, log_sum_1_ptr, log_sum_s_ptr, m_t_ptr, log_sum_t_ptr, aux_ptr,  # [N] forward statistics
    ce_scale_ptr, kl_scale_ptr,  # [N] gradient scales
    dw_acc_ptr, dw_ptr, db_ptr,  # [V, D] ACC partial sums (may alias dW), [V, D] dW in W's dtype, [V] db; None: not wanted
    N, V, D, DT,  # sizes
    stride_h, stride_w, stride_ht, stride_wt, stride_dw,  # row strides in elements
    ignore_index,  # label of positions without cross-entropy
    inv_tau: tl.float64, softcap: tl.float64, teacher_softcap: tl.float64,  # 1 / tau; softcaps (unused without HAS_*)
    logit_scale: tl.float64, teacher_logit_scale: tl.float64,  # each model's logit scale
    log_beta: tl.float64, log_1m_beta: tl.float64, beta: tl.float64,  # JSD mixture weights
    HAS_BIAS: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_TEACHER_SOFTCAP: tl.constexpr, OWN_TEACHER_SOFTCAP: tl.constexpr,  # softcaps
    HAS_LOGIT_SCALE: tl.constexpr, HAS_TEACHER_LOGIT_SCALE: tl.constexpr,  # logit scales other than 1
    DIVERGENCE: tl.constexpr,  # FORWARD_KL/REVERSE_KL/JSD
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,  # which outputs are wanted
    DOT_DTYPE: tl.constexpr, TEACHER_DOT_DTYPE: tl.constexpr, ACC: tl.constexpr,  # tile dtypes
    PRECISION: tl.constexpr, ROUND_LOGITS: tl.constexpr,  # tl.dot input precision ("ieee"/"tf32"); round logits
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes
):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    (inv_tau, softcap, inv_softcap, teacher_softcap, teacher_inv_softcap, logit_scale, teacher_logit_scale,
     log_beta, log_1m_beta, beta) = loss_scalars(inv_tau, softcap, teacher_softcap, logit_scale,
                                                 teacher_logit_scale, log_beta, log_1m_beta, beta,
                                                 OWN_TEACHER_SOFTCAP, ACC)
    one_m_beta = 1.0 - beta
    dw_offsets = cols.to(tl.int64) * stride_dw
    db = tl.zeros([BLOCK_V], ACC)

    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        # Only active rows are loaded (logits and h alike): this kernel stores per column.
        _, row_mask, labels, m, log_sum_1, log_sum_s, m_t, log_sum_t, aux, ce_scale, kl_scale = load_row_stats(
            rows, N, labels_ptr, m_ptr, log_sum_1_ptr, log_sum_s_ptr, m_t_ptr, log_sum_t_ptr, aux_ptr,
            ce_scale_ptr, kl_scale_ptr, ignore_index, ACC,
        )
        dz = logits_grad_tile(
            h_ptr, w_ptr, b_ptr, ht_ptr, wt_ptr, bt_ptr,
            labels, m, log_sum_1, log_sum_s, m_t, log_sum_t, aux, ce_scale, kl_scale, rows, cols, row_mask, col_mask,
            D, DT, stride_h, stride_w, stride_ht, stride_wt,
            inv_tau, softcap, inv_softcap, log_beta, log_1m_beta, one_m_beta,
            teacher_softcap, teacher_inv_softcap, logit_scale, teacher_logit_scale,
            HAS_BIAS, HAS_TEACHER, HAS_TEACHER_BIAS, HAS_SOFTCAP, HAS_TEACHER_SOFTCAP, HAS_LOGIT_SCALE,
            HAS_TEACHER_LOGIT_SCALE, DIVERGENCE,
            DOT_DTYPE, TEACHER_DOT_DTYPE, ACC, PRECISION, ROUND_LOGITS, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        if COMPUTE_DB:
            db += tl.sum(dz, axis=0)
        if COMPUTE_DW:
            dz_t = tl.trans(dz.to(DOT_DTYPE))  # [BLOCK_V, BLOCK_N]
            step = tl.zeros([BLOCK_V], tl.int32) + n0
            cols_read = col_mask & (step > 0)
            cols_partial = col_mask & (step + BLOCK_N < N)
            cols_final = col_mask & (step + BLOCK_N >= N)
            h_offsets = rows.to(tl.int64) * stride_h
            # As in the hidden kernel: the previous step's dW writes must be visible block-wide.
            tl.debug_barrier()
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_mask = d < D
                h_mask = row_mask[:, None] & d_mask[None, :]
                h = tl.load(h_ptr + h_offsets[:, None] + d[None, :], mask=h_mask, other=0.0)
                offsets = dw_offsets[:, None] + d[None, :]
                acc = tl.load(dw_acc_ptr + offsets, mask=cols_read[:, None] & d_mask[None, :], other=0.0)
                acc = tl.dot(dz_t, h.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC)
                tl.store(dw_acc_ptr + offsets, acc, mask=cols_partial[:, None] & d_mask[None, :])
                tl.store(dw_ptr + offsets, acc.to(dw_ptr.dtype.element_ty), mask=cols_final[:, None] & d_mask[None, :])
    if COMPUTE_DB:
        tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=col_mask)


def default_backward_configs(dtype: torch.dtype, aligned: bool = True,
                             transforms: bool = False) -> tuple[KernelConfig, KernelConfig]:
    """``(hidden kernel config, weight kernel config)`` for tiles of ``dtype``
    (:func:`tile_dtype`) in this process; ``aligned``: :func:`sizes_aligned` of the launch;
    ``transforms``: :func:`sdft_kernels.triton_common.extra_transforms` of its options."""
    if INTERPRET:
        return BACKWARD_CONFIG_INTERPRET, BACKWARD_CONFIG_INTERPRET
    if dtype.itemsize == 2:
        return BACKWARD_HIDDEN_CONFIG, BACKWARD_WEIGHT_CONFIG
    weight = BACKWARD_WEIGHT_CONFIG_FP64 if dtype.itemsize == 8 else BACKWARD_WEIGHT_CONFIG_FP32
    if transforms and dtype.itemsize == 4:
        return BACKWARD_HIDDEN_CONFIG_FP32_TRANSFORMS, weight
    if not aligned:
        return BACKWARD_HIDDEN_CONFIG_FP32_UNALIGNED, weight
    if dtype.itemsize == 8:
        return BACKWARD_HIDDEN_CONFIG_FP64, weight
    return BACKWARD_HIDDEN_CONFIG_FP32, weight


def sdft_backward(
    h: Tensor,
    W: Tensor,
    b: Optional[Tensor],
    ht: Optional[Tensor],
    Wt: Optional[Tensor],
    bt: Optional[Tensor],
    labels: Tensor,
    stats: ForwardStats,
    ce_scale: Tensor,
    kl_scale: Tensor,
    options: LossOptions,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
    *,
    hidden_config: Optional[KernelConfig] = None,
    weight_config: Optional[KernelConfig] = None,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients ``(dh [N, D], dW [V, D], db [V])`` of ``sum_i ce_scale_i * ce_i + kl_scale_i * tau^2 * D_i``.

    ``ce_scale``/``kl_scale`` are float32 ``[N]`` and already hold masks, weights, the upstream
    gradient and the normaliser; ``kl_scale`` excludes the ``tau^2`` of ``LossOptions.kl_scale``
    (the kernel applies it). ``stats`` is the forward's output. Each gradient is None unless
    asked for; dh has ``h``'s dtype, dW ``W``'s, db ``b``'s. Inputs as in ``sdft_forward``.
    """
    N, D = h.shape
    V = W.shape[0]
    need_bias_grad = need_bias_grad and b is not None
    dh = torch.empty_like(h) if need_hidden_grad else None
    dW = torch.empty_like(W) if need_weight_grad else None
    db = torch.empty_like(b) if need_bias_grad else None
    if N == 0:
        # No token: every gradient is an empty sum.
        return tuple(None if g is None else g.zero_() for g in (dh, dW, db))

    has_teacher = ht is not None
    aligned = sizes_aligned(V, D, h.stride(0), W.stride(0), *((ht.shape[1], ht.stride(0), Wt.stride(0)) if has_teacher else ()))
    default_hidden, default_weight = default_backward_configs(
        tile_dtype(h.dtype, None if ht is None else ht.dtype), aligned, extra_transforms(loss_flags(options)))
    hidden_config = hidden_config or default_hidden
    weight_config = weight_config or default_weight
    acc_dtype = accumulation_dtype(h.dtype)
    common = (h, W, b, ht, Wt, bt, labels, stats.m, stats.log_sum_1, stats.log_sum_s, stats.m_t, stats.log_sum_t,
              stats.div_aux, ce_scale, kl_scale)
    sizes = (N, V, D, ht.shape[1] if has_teacher else 0)
    strides = (h.stride(0), W.stride(0), ht.stride(0) if has_teacher else 0, Wt.stride(0) if has_teacher else 0)
    scalars = scalar_args(options)
    flags = dict(loss_flags(options), **dot_flags(h, ht, Wt, options))

    if need_hidden_grad:
        # Partial sums need ACC precision; a float32/float64 dh can hold them itself.
        dh_acc = dh if dh.dtype == acc_dtype else torch.empty(N, D, device=h.device, dtype=acc_dtype)
        cfg = hidden_config
        with on_device(h):  # the tensors' device, not the current one
            sdft_backward_hidden_kernel[(triton.cdiv(N, cfg.block_n),)](
                *common, dh_acc, dh, *sizes, *strides, dh.stride(0), *scalars, **flags,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
    if need_weight_grad or need_bias_grad:
        dW_acc = None
        if need_weight_grad:
            dW_acc = dW if dW.dtype == acc_dtype else torch.empty(V, D, device=W.device, dtype=acc_dtype)
        cfg = weight_config
        with on_device(h):
            sdft_backward_weight_kernel[(triton.cdiv(V, cfg.block_v),)](
                *common, dW_acc, dW, db, *sizes, *strides, dW.stride(0) if need_weight_grad else 0, *scalars,
                **flags, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
    return dh, dW, db
