"""The chunked GPU path's epilogue: loss rows and logit gradient of one ``[C, V]`` logits chunk.

``impl="triton_chunked"`` runs the chunk loop of :mod:`sdft_kernels.chunk_loop` with the
four GEMMs in cuBLAS (through ``torch.mm``) and everything between them in this one kernel.
Per chunk of C tokens::

    z_s = h_c @ W.T,  z_t = ht_c @ Wt.T          # cuBLAS, [C, V] float32
    ce, div, dz = epilogue(z_s, z_t)              # this kernel; dz in the inputs' dtype
    dh_c = dz @ W,  dW += dz.T @ h_c              # cuBLAS

So the whole forward+backward costs the essential ``8 N D V`` FLOPs at cuBLAS speed plus one
memory-bound kernel that reads each logit twice (three times for JSD) and writes the gradient
once, instead of the fused kernels' recomputation (``16 N D V`` FLOPs in Triton tiles). The
price is memory: two or three ``[C, V]`` buffers, sized by the chunk budget.

The GEMM outputs stay float32 (``torch.mm(..., out_dtype=torch.float32)``), and the kernel
adds the biases in float32; with ``LossOptions.logits_dtype="input"`` they are rounded to the
inputs' dtype, bias included, as ``F.linear`` rounds them (:mod:`sdft_kernels.logits_gemm`).
The statistics and gradient are computed in float32 (float64 for float64 inputs) with the
arithmetic of :mod:`sdft_kernels.triton_math`, the same as the fused kernels'. The gradient
is written in the inputs' dtype, for the gradient GEMMs: over the logits where those have
that dtype, else into a third buffer.

One program owns ``BLOCK_N`` rows and sweeps them three times over the vocabulary at most:
statistics, the JSD's second sweep, and the gradient. Each element of ``dz`` depends on that
element of ``z_s`` and on its row's finished statistics, so writing ``dz`` in place over
``z_s`` never overwrites a logit that is still to be read.
"""

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .logits_gemm import logits_into, rounded_logits_into
from .options import LossOptions
from .reduction import accumulation_dtype
from .triton_common import (
    INTERPRET,
    JSD,
    apply_softcap,
    load_labels,
    loss_flags,
    loss_scalars,
    on_device,
    presence_flags,
    scalar_args,
    tl_dtype,
)
from .triton_math import (
    jsd_from_sums,
    jsd_tile_sums,
    logit_grad,
    masked_divergence,
    metrics_finish,
    sweep_finish,
    sweep_init,
    sweep_metrics,
    sweep_student,
    sweep_teacher,
)


class EpilogueConfig(NamedTuple):
    """Rows and vocabulary entries per tile (powers of two), warps per program."""

    block_n: int
    block_v: int
    num_warps: int


# Memory-bound: wide rows of 16-byte loads keep enough bytes in flight; one row per program
# gives C programs per chunk (C is in the thousands at real vocabularies).
EPILOGUE_CONFIG = EpilogueConfig(block_n=1, block_v=4096, num_warps=8)
# float32 logits of half-precision inputs (the default): the same bytes in flight from half the
# width; 4096 wide, the softcap variant spilled on sm_90 (4 B). Also float32 inputs with the
# metrics' running sums (4096 wide: 12 B spilled on sm_80 and sm_90).
EPILOGUE_CONFIG_MIXED = EpilogueConfig(block_n=1, block_v=2048, num_warps=8)
# float64 tiles take twice the registers: 4096 wide, the JSD variant spilled (52 B on sm_90);
# 2048 wide, the softcap variant under triton 3.6 (4 B on sm_80).
EPILOGUE_CONFIG_FP64 = EpilogueConfig(block_n=1, block_v=1024, num_warps=8)
# The interpreter runs programs one after another: few, large tiles are fastest there.
EPILOGUE_CONFIG_INTERPRET = EpilogueConfig(block_n=16, block_v=256, num_warps=1)


@triton.jit
def load_logit_tile(
    z_ptr, b_ptr,  # [C, V] logits (any float dtype), [V] bias
    row_offsets, cols, row_mask, col_mask,  # [BLOCK_N] int64 row * stride, [BLOCK_V] columns
    scale, softcap, inv_softcap,  # ACC scalars: the model's logit scale and softcap
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr,
):
    """One tile of stored logits in ACC, bias added, scaled and softcapped; masked entries are 0."""
    z = tl.load(z_ptr + row_offsets[:, None] + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                other=0.0).to(ACC)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    if HAS_SCALE:
        z = z * scale
    if HAS_SOFTCAP:
        z = apply_softcap(z, softcap, inv_softcap)
    return z


@triton.jit
def load_tile_pair(
    zs_ptr, zt_ptr, b_ptr, bt_ptr,  # [C, V] student and teacher logits, their [V] biases
    zs_offsets, zt_offsets, cols, row_mask, col_mask,  # [BLOCK_N] int64 row offsets, [BLOCK_V] columns
    logit_scale, softcap, inv_softcap,  # ACC scalars: the student's transforms
    teacher_logit_scale, teacher_softcap, teacher_inv_softcap,  # and the teacher's
    HAS_BIAS: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_TEACHER_SOFTCAP: tl.constexpr, HAS_LOGIT_SCALE: tl.constexpr,
    HAS_TEACHER_LOGIT_SCALE: tl.constexpr, ACC: tl.constexpr,
):
    """``(z_s, z_t)`` tiles (:func:`load_logit_tile`); without a teacher ``z_t`` is ``z_s``."""
    z_s = load_logit_tile(zs_ptr, b_ptr, zs_offsets, cols, row_mask, col_mask, logit_scale, softcap, inv_softcap,
                          HAS_BIAS, HAS_LOGIT_SCALE, HAS_SOFTCAP, ACC)
    z_t = z_s
    if HAS_TEACHER:
        z_t = load_logit_tile(zt_ptr, bt_ptr, zt_offsets, cols, row_mask, col_mask, teacher_logit_scale,
                              teacher_softcap, teacher_inv_softcap, HAS_TEACHER_BIAS, HAS_TEACHER_LOGIT_SCALE,
                              HAS_TEACHER_SOFTCAP, ACC)
    return z_s, z_t


@presence_flags(HAS_BIAS="b_ptr", HAS_TEACHER="zt_ptr", HAS_TEACHER_BIAS="bt_ptr", COMPUTE_GRAD="ce_scale_ptr",
                METRICS="entropy_ptr")
@triton.jit
def sdft_chunk_epilogue_kernel(
    zs_ptr, zt_ptr, b_ptr, bt_ptr,  # [C, V] student / teacher logits (GEMM outputs), [V] biases; None: absent
    labels_ptr, kl_mask_ptr, ce_scale_ptr, kl_scale_ptr,  # [C] int64, uint8, ACC, ACC (scales None: no dz)
    ce_ptr, div_ptr,  # [C] ACC outputs: cross-entropy (0 if ignored), divergence (0 outside kl_mask)
    entropy_ptr, top1_ptr,  # [C] ACC and uint8 metric outputs; None: not wanted
    dz_ptr,  # [C, V] logit gradient; may be zs_ptr itself
    C, V,  # sizes
    stride_zs, stride_zt, stride_dz,  # row strides in elements (columns are contiguous)
    ignore_index,  # label of positions without cross-entropy
    inv_tau: tl.float64, softcap: tl.float64, teacher_softcap: tl.float64,  # 1 / tau; softcaps (unused without HAS_*)
    logit_scale: tl.float64, teacher_logit_scale: tl.float64,  # each model's logit scale
    log_beta: tl.float64, log_1m_beta: tl.float64, beta: tl.float64,  # JSD mixture weights
    HAS_BIAS: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_TEACHER_SOFTCAP: tl.constexpr, OWN_TEACHER_SOFTCAP: tl.constexpr,  # softcaps
    HAS_LOGIT_SCALE: tl.constexpr, HAS_TEACHER_LOGIT_SCALE: tl.constexpr,  # logit scales other than 1
    DIVERGENCE: tl.constexpr,  # FORWARD_KL/REVERSE_KL/JSD
    COMPUTE_GRAD: tl.constexpr,  # write dz (needs ce_scale/kl_scale)
    DFT: tl.constexpr,  # loss_type="dft": each row's cross-entropy weighted by its constant exp(-ce)
    METRICS: tl.constexpr,  # store the student's entropy and top-1 per row
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < C
    zs_offsets = rows.to(tl.int64) * stride_zs
    zt_offsets = rows.to(tl.int64) * stride_zt
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
        # The student tile is swept before the teacher's is loaded (not load_tile_pair): with
        # both live, ptxas spilled the float32 JSD variant on sm_80.
        z_s = load_logit_tile(zs_ptr, b_ptr, zs_offsets, cols, row_mask, col_mask, logit_scale, softcap,
                              inv_softcap, HAS_BIAS, HAS_LOGIT_SCALE, HAS_SOFTCAP, ACC)
        if METRICS:
            xs, max_before = sweep_metrics(z_s, cols, col_mask, labels, m, sum_1, xs, max_before)
        m_new, sum_1, sum_s, z_label, alpha_s, e_s = sweep_student(
            z_s, cols, col_mask, labels, m, sum_1, sum_s, z_label, inv_tau, HAS_TEACHER,
        )
        if HAS_TEACHER:
            z_t = load_logit_tile(zt_ptr, bt_ptr, zt_offsets, cols, row_mask, col_mask, teacher_logit_scale,
                                  teacher_softcap, teacher_inv_softcap, HAS_TEACHER_BIAS, HAS_TEACHER_LOGIT_SCALE,
                                  HAS_TEACHER_SOFTCAP, ACC)
            m_t, sum_t, weighted = sweep_teacher(
                z_s, z_t, col_mask, alpha_s, e_s, m_t, sum_t, weighted, inv_tau, DIVERGENCE,
            )
        m = m_new
    log_sum_1, ce, log_sum_s, log_sum_t, div, aux = sweep_finish(
        m, sum_1, sum_s, z_label, m_t, sum_t, weighted, labels, inv_tau, HAS_TEACHER, DIVERGENCE,
    )
    if METRICS:
        entropy, top1 = metrics_finish(m, sum_1, xs, z_label, max_before, labels)
        tl.store(entropy_ptr + rows, entropy, mask=row_mask)
        tl.store(top1_ptr + rows, top1.to(tl.uint8), mask=row_mask)
    if HAS_TEACHER:
        if DIVERGENCE == JSD:
            kl_t = tl.zeros([BLOCK_N], ACC)
            kl_s = tl.zeros([BLOCK_N], ACC)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                col_mask = cols < V
                z_s, z_t = load_tile_pair(
                    zs_ptr, zt_ptr, b_ptr, bt_ptr, zs_offsets, zt_offsets, cols, row_mask, col_mask,
                    logit_scale, softcap, inv_softcap, teacher_logit_scale, teacher_softcap, teacher_inv_softcap,
                    HAS_BIAS, HAS_TEACHER, HAS_TEACHER_BIAS, HAS_SOFTCAP, HAS_TEACHER_SOFTCAP, HAS_LOGIT_SCALE,
                    HAS_TEACHER_LOGIT_SCALE, ACC)
                part_t, part_s = jsd_tile_sums(
                    z_s, z_t, col_mask, m, m_t, log_sum_s, log_sum_t, inv_tau, log_beta, log_1m_beta,
                )
                kl_t += part_t
                kl_s += part_s
            div, aux = jsd_from_sums(kl_t, kl_s, beta)
        div = masked_divergence(div, kl_mask_ptr, rows, row_mask)
    tl.store(ce_ptr + rows, ce, mask=row_mask)
    tl.store(div_ptr + rows, div, mask=row_mask)

    if COMPUTE_GRAD:
        ce_scale = tl.load(ce_scale_ptr + rows, mask=row_mask, other=0.0).to(ACC)
        if DFT:  # ce is 0 where the label is ignored, and so is ce_scale
            ce_scale = tl.where(ce_scale != 0.0, ce_scale * tl.exp(-ce), 0.0)
        kl_scale = tl.load(kl_scale_ptr + rows, mask=row_mask, other=0.0).to(ACC)
        # Rows that count for nothing get an exact zero gradient, whatever their logits hold.
        active = row_mask & ((ce_scale != 0.0) | (kl_scale != 0.0))
        one_m_beta = 1.0 - beta
        dz_offsets = rows.to(tl.int64) * stride_dz
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            z_s, z_t = load_tile_pair(zs_ptr, zt_ptr, b_ptr, bt_ptr, zs_offsets, zt_offsets, cols, row_mask,
                                      col_mask, logit_scale, softcap, inv_softcap, teacher_logit_scale,
                                      teacher_softcap, teacher_inv_softcap, HAS_BIAS, HAS_TEACHER,
                                      HAS_TEACHER_BIAS, HAS_SOFTCAP, HAS_TEACHER_SOFTCAP, HAS_LOGIT_SCALE,
                                      HAS_TEACHER_LOGIT_SCALE, ACC)
            dz = logit_grad(
                z_s, z_t, cols, labels, m, log_sum_1, log_sum_s, m_t, log_sum_t, aux, ce_scale, kl_scale,
                inv_tau, inv_softcap, log_beta, log_1m_beta, one_m_beta, HAS_TEACHER, HAS_SOFTCAP, DIVERGENCE,
            )
            dz = tl.where(active[:, None] & col_mask[None, :], dz, 0.0)
            tl.store(dz_ptr + dz_offsets[:, None] + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & col_mask[None, :])


def default_epilogue_config(dtype: torch.dtype = torch.float32, dz_dtype: Optional[torch.dtype] = None,
                            metrics: bool = False) -> EpilogueConfig:
    """The epilogue's tiles for logits of ``dtype`` and a gradient of ``dz_dtype`` (default the
    same) in this process (GPU or interpreter); ``metrics``: the launch stores the metrics."""
    if INTERPRET:
        return EPILOGUE_CONFIG_INTERPRET
    if dtype == torch.float64:
        return EPILOGUE_CONFIG_FP64
    narrower_dz = dz_dtype is not None and dz_dtype.itemsize < dtype.itemsize
    return EPILOGUE_CONFIG_MIXED if narrower_dz or (metrics and dtype.itemsize == 4) else EPILOGUE_CONFIG


def chunk_epilogue(
    z_s: Tensor,
    z_t: Optional[Tensor],
    b: Optional[Tensor],
    bt: Optional[Tensor],
    labels: Tensor,
    kl_mask: Tensor,
    options: LossOptions,
    ce_scale: Optional[Tensor] = None,
    kl_scale: Optional[Tensor] = None,
    *,
    dz: Optional[Tensor] = None,
    metrics: Optional[tuple[Tensor, Tensor]] = None,
    config: Optional[EpilogueConfig] = None,
) -> tuple[Tensor, Tensor]:
    """Masked loss rows ``(ce [C], div [C])`` of one chunk; with scales, the logit gradient is
    written to ``dz`` (default: over ``z_s``, in place); with ``metrics``, an ``(entropy [C]
    float32/float64, top1 [C] bool)`` pair of outputs, the student's entropy at temperature 1
    and whether the label is its first maximal logit (0 / False where the label is ignored).

    ``z_s``/``z_t``: ``[C, V]`` logits *before* bias and softcap (the kernel applies both), rows
    contiguous; ``labels [C]`` int64, ``kl_mask [C]`` bool; ``ce_scale``/``kl_scale [C]`` as in
    :func:`sdft_kernels.reduction.row_scales`. The rows are float32 (float64 for float64
    logits). ``dz`` ``[C, V]`` (rows contiguous) gets the gradient in its own dtype, exactly 0
    on rows whose scales are both 0.
    """
    C, V = z_s.shape
    dz = z_s if dz is None else dz
    acc_dtype = accumulation_dtype(z_s.dtype)
    ce = torch.empty(C, device=z_s.device, dtype=acc_dtype)
    div = torch.empty(C, device=z_s.device, dtype=acc_dtype)
    if C == 0:
        return ce, div
    config = config or default_epilogue_config(z_s.dtype, dz.dtype, metrics is not None)
    with on_device(z_s):  # the tensors' device, not the current one
        sdft_chunk_epilogue_kernel[(triton.cdiv(C, config.block_n),)](
            z_s, z_t, b, bt, labels, kl_mask.view(torch.uint8), ce_scale, kl_scale, ce, div,
            None if metrics is None else metrics[0], None if metrics is None else metrics[1].view(torch.uint8), dz,
            C, V, z_s.stride(0), 0 if z_t is None else z_t.stride(0), dz.stride(0),
            *scalar_args(options), **loss_flags(options), DFT=options.loss_type == "dft", ACC=tl_dtype(acc_dtype),
            BLOCK_N=config.block_n, BLOCK_V=config.block_v, num_warps=config.num_warps,
        )
    return ce, div


# The Triton epilogue keeps two [chunk, V] logit buffers, float32 by default (and, for
# half-precision inputs, a third for dz in their dtype: the gradient GEMMs' operand). Fewer,
# larger chunks mean fewer read-modify-writes of the float32 weight gradient (8 V D bytes each):
# 1 GiB gives chunks of about 840 tokens at Llama-3's V = 128256 for bfloat16 inputs.
TRITON_CHUNK_BUDGET_BYTES = 2**30


class TritonEpilogue:
    """Logits from ``torch.mm`` (float32 by default, :mod:`sdft_kernels.logits_gemm`), then one
    Triton kernel per chunk (:func:`sdft_kernels.triton_chunked.chunk_epilogue`);
    ``impl="triton_chunked"``."""

    budget_bytes = TRITON_CHUNK_BUDGET_BYTES

    @staticmethod
    def max_rows() -> None:
        """As many rows as the budget allows: fewer read-modify-writes of the dW sums."""
        return None

    @staticmethod
    def row_bytes(V: int, dtype: torch.dtype, teacher_dtype: Optional[torch.dtype], options: LossOptions) -> int:
        if options.logits_dtype == "input":
            return max(V, 1) * (dtype.itemsize + (teacher_dtype.itemsize if teacher_dtype is not None else 0))
        acc = accumulation_dtype(dtype).itemsize
        dz = dtype.itemsize if dtype.itemsize < acc else 0
        return max(V, 1) * (acc + (acc if teacher_dtype is not None else 0) + dz)

    @staticmethod
    def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """The kernel writes dz in the inputs' dtype: the GEMMs take it as is."""
        return dtype

    @staticmethod
    def chunk(h, W, b, ht, Wt, bt, y, kl_mask, options, ce_scale, kl_scale, ws, metrics=False):
        """``(ce [C], div [C] or None, dz [C, V] or None, (entropy, top1) or None)``; all
        masked, dz in ``h``'s dtype."""
        rows = h.shape[0]
        if options.logits_dtype == "input":
            # Rounded as F.linear rounds them, bias included; dz then overwrites them in place.
            z_s = rounded_logits_into(ws.get("z_s", rows, h.dtype), h, W, b)
            z_t = None if ht is None else rounded_logits_into(ws.get("z_t", rows, ht.dtype), ht, Wt, bt)
            b = bt = None
            dz = z_s
        else:
            # float32 logits; the kernel adds the biases in float32.
            acc = accumulation_dtype(h.dtype)
            z_s = logits_into(ws.get("z_s", rows, acc), h, W, None, lambda w: ws.upcast(w, acc))
            z_t = None if ht is None else logits_into(ws.get("z_t", rows, acc), ht, Wt, None,
                                                      lambda w: ws.upcast(w, acc))
            dz = z_s if h.dtype == acc else ws.get("dz", rows, h.dtype)
        out = None
        if metrics:
            out = (torch.empty(rows, dtype=accumulation_dtype(h.dtype), device=h.device),
                   torch.empty(rows, dtype=torch.bool, device=h.device))
        ce, div = chunk_epilogue(z_s, z_t, b, bt, y, kl_mask, options, ce_scale, kl_scale, dz=dz, metrics=out)
        return ce, (div if ht is not None else None), (dz if ce_scale is not None else None), out
