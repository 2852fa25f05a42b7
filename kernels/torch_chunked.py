"""The chunk loop, and its plain-torch epilogue: what CPU users train with.

Tokens are processed in chunks of ``chunk_size`` rows, so the transient memory is a few
``[chunk, V]`` buffers instead of whole ``[N, V]`` logits. What happens between a chunk's
logit GEMMs and its gradient GEMMs is the *epilogue*: :class:`TorchEpilogue` (element-wise
torch ops on float32 buffers; ``impl="torch"``) or :class:`TritonEpilogue` (one Triton kernel
on logits kept in the inputs' dtype; ``impl="triton_chunked"``, see
:mod:`sdft_kernels.triton_chunked`). When gradients are needed
and the upstream gradient is a scalar (``reduction`` "mean" or "sum"), the logit gradient of a
chunk is formed right after its loss and pushed through the two gradient GEMMs at once: the
whole forward+backward then costs the four essential GEMMs (``8 N D V`` FLOPs) plus a few
element-wise passes. For ``reduction="none"`` the weight gradient depends on the per-row
upstream gradient, so the backward recomputes the chunks instead.

Positions that count for neither term (label ignored and outside ``kl_mask``) are dropped
before any GEMM on CPU: with 20 % ignored labels that is 20 % fewer FLOPs.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .autograd_guard import first_order_only
from .options import LossOptions
from .reduction import combine, row_scales
from .reference import accumulation_dtype

# Transient bytes the torch epilogue may use by default. Four reusable [chunk, V] float32
# buffers (student logits, log-probabilities at 1 and at tau, teacher log-probabilities), a fifth
# with a softcap, and about one buffer of temporaries, so 192 MiB gives 256-token chunks at
# V = 32768.
DEFAULT_CHUNK_BUDGET_BYTES = 192 * 2**20
_LIVE_BUFFERS = 6
# The Triton epilogue keeps two [chunk, V] buffers in the inputs' dtype. Fewer, larger chunks
# mean fewer read-modify-writes of the float32 weight gradient (8 V D bytes each): 1 GiB gives
# 2048-token chunks at Llama-3's V = 128256 in bfloat16.
TRITON_CHUNK_BUDGET_BYTES = 2**30


def default_chunk_size(vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES,
                       row_bytes: Optional[int] = None) -> int:
    """Rows per chunk so that the chunk's buffers stay within ``budget_bytes``.

    ``row_bytes``: bytes of one chunk row; default: the torch epilogue's float32 buffers.
    """
    row_bytes = row_bytes or _LIVE_BUFFERS * 4 * max(vocab_size, 1)
    return max(16, int(budget_bytes // row_bytes))


class Grads(NamedTuple):
    hidden: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for ``[C, V]`` inputs without a ``[C, V]`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _Workspace:
    """``[chunk, V]`` buffers reused by every chunk of one call.

    A fresh 32 MB tensor per operation is mapped by the allocator and zeroed by the kernel page
    by page; at N=2048, V=32768 those page faults cost about as much as all the arithmetic.
    """

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.vocab, self.dtype, self.device = rows, vocab, dtype, device
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, rows: int, dtype: Optional[torch.dtype] = None) -> Tensor:
        """Rows ``[:rows]`` of buffer ``name`` (``dtype`` defaults to the workspace's)."""
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = torch.empty(self.rows, self.vocab, dtype=dtype or self.dtype,
                                                    device=self.device)
        return buf[:rows]


def _logits_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], softcap) -> None:
    """``out = softcap(hidden @ weight.T + bias)`` in ``out``'s dtype (GEMM in the input dtype)."""
    if hidden.dtype == out.dtype:
        if bias is None:
            torch.mm(hidden, weight.t(), out=out)
        else:
            torch.addmm(bias, hidden, weight.t(), out=out)
    else:
        out.copy_(F.linear(hidden, weight, bias))
    if softcap is not None:
        out.div_(softcap).tanh_().mul_(softcap)


def _log_softmax_into(out: Tensor, x: Tensor) -> Tensor:
    """``out = log_softmax(x, -1)`` with no temporary (``out`` may be ``x``)."""
    try:
        return torch._log_softmax(x, -1, False, out=out)
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch without the out= overload
        return torch.sub(x, torch.logsumexp(x, -1, keepdim=True), out=out)


def _divergence(logp_s: Tensor, logp_t: Tensor, scratch: Tensor, options: LossOptions, want_grad: bool):
    """Row divergence ``[C]`` and ``G = dD/d(z_s / tau)`` ``[C, V]`` (or None).

    Overwrites its three buffers; ``G`` is returned in one of them.
    """
    if options.divergence == "forward_kl":
        p_t = torch.exp(logp_t, out=scratch)
        div = _rowdot(p_t, logp_t.sub_(logp_s))
        return div, (logp_s.exp_().sub_(p_t) if want_grad else None)
    if options.divergence == "reverse_kl":
        p_s = torch.exp(logp_s, out=scratch)
        ratio = logp_t.neg_().add_(logp_s)  # log p_s - log p_t
        div = _rowdot(p_s, ratio)
        return div, (ratio.sub_(div.unsqueeze(1)).mul_(p_s) if want_grad else None)
    beta = options.jsd_beta
    log_beta, log_1m_beta = options.jsd_log_weights
    log_m = torch.logaddexp(logp_t + log_beta, logp_s + log_1m_beta, out=scratch)
    p_t = logp_t.exp()
    kl_t = _rowdot(p_t, logp_t.sub_(log_m))
    del p_t
    p_s = torch.exp(logp_s, out=logp_t)  # logp_t is free now
    ratio_s = logp_s.sub_(log_m)  # log p_s - log m
    kl_s = _rowdot(p_s, ratio_s)
    div = beta * kl_t + (1.0 - beta) * kl_s
    if not want_grad:
        return div, None
    return div, ratio_s.sub_(kl_s.unsqueeze(1)).mul_(p_s).mul_(1.0 - beta)


def _torch_chunk(h, W, b, ht, Wt, bt, y, options: LossOptions, ce_scale, kl_scale, ws: _Workspace):
    """Loss rows of one chunk and, if scales are given, its logit gradient ``[C, V]``.

    Returns ``(ce [C], div [C] or None, dz or None)``; ``ce`` and ``div`` are unmasked. ``dz``
    lives in the workspace: use it before the next chunk.
    """
    rows = h.shape[0]
    inv_tau = 1.0 / options.temperature
    want_grad = ce_scale is not None
    z = ws.get("z", rows)
    _logits_into(z, h, W, b, None)
    cap = None
    if options.softcap is not None:  # keep tanh(z / c): the gradient needs 1 - tanh^2
        cap = torch.div(z, options.softcap, out=ws.get("cap", rows)).tanh_()
        torch.mul(cap, options.softcap, out=z)
    logp_1 = _log_softmax_into(ws.get("logp_1", rows), z)
    safe_y = y.clamp(0, z.shape[1] - 1).unsqueeze(1)  # ignored rows: any column, their scale is 0
    ce = logp_1.gather(1, safe_y).squeeze(1).neg()

    div = grad_kl = None
    if ht is not None:
        logp_s = _log_softmax_into(ws.get("logp_s", rows), z.mul_(inv_tau))
        logp_t = ws.get("logp_t", rows)
        _logits_into(logp_t, ht, Wt, bt, options.softcap)
        _log_softmax_into(logp_t, logp_t.mul_(inv_tau))
        div, grad_kl = _divergence(logp_s, logp_t, z, options, want_grad)

    if not want_grad:
        return ce, div, None
    dz = logp_1.exp_().mul_(ce_scale.unsqueeze(1))  # ce_scale * softmax(z)
    dz.scatter_add_(1, safe_y, -ce_scale.unsqueeze(1))
    if grad_kl is not None:
        dz.add_(grad_kl.mul_((kl_scale * options.temperature).unsqueeze(1)))
    if cap is not None:  # d(c tanh(x / c))/dx = 1 - tanh^2
        dz.mul_(cap.square_().neg_().add_(1.0))
    return ce, div, dz


class TorchEpilogue:
    """Element-wise torch ops on float32 (float64) buffers: runs anywhere; ``impl="torch"``."""

    budget_bytes = DEFAULT_CHUNK_BUDGET_BYTES

    @staticmethod
    def row_bytes(V: int, dtype: torch.dtype, teacher_dtype: Optional[torch.dtype]) -> int:
        return _LIVE_BUFFERS * accumulation_dtype(dtype).itemsize * max(V, 1)

    @staticmethod
    def chunk(h, W, b, ht, Wt, bt, y, kl_mask, options, ce_scale, kl_scale, ws):
        """``(ce [C], div [C] or None, dz [C, V] or None)``; ce/div unmasked, dz in float32."""
        return _torch_chunk(h, W, b, ht, Wt, bt, y, options, ce_scale, kl_scale, ws)


class TritonEpilogue:
    """Logits from ``torch.mm`` in the inputs' dtype, then one Triton kernel per chunk
    (:func:`sdft_kernels.triton_chunked.chunk_epilogue`); ``impl="triton_chunked"``."""

    budget_bytes = TRITON_CHUNK_BUDGET_BYTES

    @staticmethod
    def row_bytes(V: int, dtype: torch.dtype, teacher_dtype: Optional[torch.dtype]) -> int:
        return max(V, 1) * (dtype.itemsize + (teacher_dtype.itemsize if teacher_dtype is not None else 0))

    @staticmethod
    def chunk(h, W, b, ht, Wt, bt, y, kl_mask, options, ce_scale, kl_scale, ws):
        """``(ce [C], div [C] or None, dz [C, V] or None)``; ce/div masked, dz in ``h``'s dtype."""
        from .triton_chunked import chunk_epilogue  # triton imports lazily: CPU users need not pay

        rows = h.shape[0]
        z_s = torch.mm(h, W.t(), out=ws.get("z_s", rows, h.dtype))
        z_t = None if ht is None else torch.mm(ht, Wt.t(), out=ws.get("z_t", rows, ht.dtype))
        ce, div = chunk_epilogue(z_s, z_t, b, bt, y, kl_mask, options, ce_scale, kl_scale)
        return ce, (div if ht is not None else None), (z_s if ce_scale is not None else None)


_FP32_ACCUMULATING_ADDMM: dict[tuple[torch.device, torch.dtype], bool] = {}


def _fp32_accumulating_addmm(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``torch.addmm(acc32, a.t(), b, beta=..., out_dtype=float32, out=acc32)`` works
    for ``dtype`` products on ``device``, as :func:`_accumulate_weight_grad` calls it.

    cuBLAS can accumulate half-precision products into a float32 matrix in place (torch
    >= 2.8 exposes it as ``out_dtype``; 2.8 and 2.9 also required ``self`` in the inputs'
    dtype); the CPU backend cannot. The probe is the real call pattern on small integers
    (exact in every dtype): a transposed first factor, ``beta=0`` over NaN garbage, then
    ``beta=1``, compared with the float32 product. Once per device and dtype.
    """
    key = (device, dtype)
    if key not in _FP32_ACCUMULATING_ADDMM:
        try:
            a = (torch.arange(12, device=device).reshape(3, 4) % 5 - 2).to(dtype)
            b = (torch.arange(15, device=device).reshape(3, 5) % 7 - 3).to(dtype)
            acc = torch.full((4, 5), float("nan"), dtype=torch.float32, device=device)
            torch.addmm(acc, a.t(), b, beta=0.0, out_dtype=torch.float32, out=acc)
            torch.addmm(acc, a.t(), b, beta=1.0, out_dtype=torch.float32, out=acc)
            ok = bool(torch.equal(acc, 2 * (a.float().t() @ b.float())))
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _FP32_ACCUMULATING_ADDMM[key] = ok
    return _FP32_ACCUMULATING_ADDMM[key]


def _weight_grad_dtype(dz_dtype: torch.dtype, acc: torch.dtype, device: torch.device) -> torch.dtype:
    """float32 (float64) sums, unless dz is half precision and nothing can accumulate it into
    float32 at GEMM speed: then the sums stay in dz's dtype, rounded once per chunk."""
    if dz_dtype == acc or _fp32_accumulating_addmm(device, dz_dtype):
        return acc
    return dz_dtype


def _accumulate_weight_grad(d_w: Tensor, dz: Tensor, h_c: Tensor, first: bool) -> None:
    """``d_w (+)= dz^T @ h_c``; the first chunk overwrites (``beta=0`` ignores what d_w held)."""
    beta = 0.0 if first else 1.0
    if dz.dtype == d_w.dtype:
        d_w.addmm_(dz.t(), h_c if h_c.dtype == dz.dtype else h_c.to(dz.dtype), beta=beta)
    else:  # half-precision dz into float32 sums (see _fp32_accumulating_addmm)
        torch.addmm(d_w, dz.t(), h_c, beta=beta, out_dtype=d_w.dtype, out=d_w)


def chunked_sdft(
    h, W, b, ht, Wt, bt, labels, label_mask, kl_mask, options: LossOptions,
    ce_scale: Optional[Tensor], kl_scale: Optional[Tensor],
    need: tuple[bool, bool, bool], chunk_size: Optional[int], epilogue=TorchEpilogue,
) -> tuple[Tensor, Tensor, Grads]:
    """Masked loss rows ``ce_rows [N]``, ``div_rows [N]`` and, with scales, the gradients.

    ``need`` says which of (hidden, weight, bias) gradients to form; ``ce_scale``/``kl_scale``
    ``[N]`` are the per-row factors of :func:`sdft_kernels.reduction.row_scales`;
    ``epilogue`` is :class:`TorchEpilogue` or :class:`TritonEpilogue`.
    """
    N, V = h.shape[0], W.shape[0]
    acc = accumulation_dtype(h.dtype)
    ce_rows = torch.zeros(N, dtype=acc, device=h.device)
    div_rows = torch.zeros(N, dtype=acc, device=h.device)
    want_grad = ce_scale is not None and any(need)

    rows = label_mask | kl_mask
    # Dropping rows that count for nothing needs their indices on the host: only on CPU,
    # where that costs no device synchronisation.
    index = rows.nonzero().squeeze(1) if h.device.type == "cpu" else None
    if index is not None and index.numel() == N:
        index = None
    if h.device.type != "cpu":  # keep uncounted rows, but zero them: a NaN there stays out
        keep = rows.unsqueeze(1)
        h = torch.where(keep, h, h.new_zeros(()))
        ht = None if ht is None else torch.where(keep, ht, ht.new_zeros(()))
    M = N if index is None else index.numel()
    step = chunk_size or default_chunk_size(
        V, epilogue.budget_bytes, epilogue.row_bytes(V, h.dtype, None if ht is None else ht.dtype))
    if chunk_size is None and M > 0:  # equal chunks: no small, inefficient GEMM at the end
        step = -(-M // -(-M // step))
    ws = _Workspace(min(step, max(M, 1)), V, acc, h.device)

    # Every row of d_h is written by some chunk unless rows were dropped; d_w is overwritten by
    # the first chunk. The dz of a chunk is the torch epilogue's float32 or the Triton one's
    # input dtype. On a GPU, a float32 dz of half-precision inputs is rounded to their dtype
    # before the gradient GEMMs (as the Triton paths do), so that they run on tensor cores
    # rather than as float32 products; on CPU it stays float32. The weight gradient's sums are
    # float32 either way where the device allows.
    gemm_dtype = h.dtype if epilogue is TritonEpilogue or h.device.type != "cpu" else acc
    d_h = d_w = d_b = None
    if want_grad and need[0]:
        d_h = torch.zeros_like(h) if index is not None or M == 0 else torch.empty_like(h)
    if want_grad and need[1]:
        d_w = torch.empty(W.shape, dtype=_weight_grad_dtype(gemm_dtype, acc, W.device), device=W.device)
        if M == 0:
            d_w.zero_()
    if want_grad and need[2]:
        d_b = torch.zeros(V, dtype=acc, device=W.device)

    def take(t, s, e):
        if t is None:
            return None
        return t[s:e] if index is None else t.index_select(0, index[s:e])

    for s in range(0, M, step):
        e = min(s + step, M)
        rows_ix = slice(s, e) if index is None else index[s:e]
        h_c = take(h, s, e)
        ce, div, dz = epilogue.chunk(
            h_c, W, b, take(ht, s, e), Wt, bt, take(labels, s, e), take(kl_mask, s, e), options,
            take(ce_scale, s, e) if want_grad else None, take(kl_scale, s, e) if want_grad else None, ws,
        )
        ce_rows[rows_ix] = torch.where(take(label_mask, s, e), ce, 0.0)
        if div is not None:
            div_rows[rows_ix] = torch.where(take(kl_mask, s, e), div, 0.0)
        if dz is None:
            continue
        if d_b is not None:  # from dz as the epilogue formed it, before any rounding
            d_b += dz.sum(0, dtype=acc)
        if dz.dtype != gemm_dtype:  # into a reused buffer: no fresh [chunk, V] per chunk
            dz = ws.get("dz_gemm", dz.shape[0], gemm_dtype).copy_(dz)
        if d_h is not None:
            if dz.dtype == h.dtype and index is None:
                torch.mm(dz, W, out=d_h[s:e])
            else:
                d_h[rows_ix] = (dz.to(h.dtype) @ W) if dz.dtype != h.dtype else dz @ W
        if d_w is not None:
            _accumulate_weight_grad(d_w, dz, h_c, first=s == 0)
        del dz

    grads = Grads(
        d_h,
        None if d_w is None else d_w.to(W.dtype),
        None if d_b is None else d_b.to(b.dtype),
    )
    return ce_rows, div_rows, grads


class TorchChunkedSDFT(torch.autograd.Function):
    """Autograd glue for :func:`chunked_sdft`; returns ``(loss, ce, kl)``.

    ``epilogue`` (the last argument) picks the chunk epilogue: :class:`TorchEpilogue` or
    :class:`TritonEpilogue`.
    """

    @staticmethod
    def forward(ctx, h, W, b, ht, Wt, bt, labels, label_mask, kl_mask, denom, options, chunk_size,
                epilogue=TorchEpilogue):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        # float16 excepted: its logit gradient, formed for an upstream gradient of 1, would
        # flush the softmax tail (~1 / (N V)) to zero before a GradScaler's loss scale could
        # lift it; there the backward forms it with the real upstream gradient, as autograd
        # over plain logits does (recomputing the logits: 12 NDV FLOPs instead of 8).
        eager = any(need) and options.reduction != "none" and h.dtype != torch.float16
        ce_scale = kl_scale = None
        if eager:  # the upstream gradient will be a scalar: form the gradients now.
            ce_scale, kl_scale = row_scales(torch.ones((), dtype=denom.dtype, device=denom.device),
                                            denom, label_mask, kl_mask, options)
        ce_rows, div_rows, grads = chunked_sdft(
            h, W, b, ht, Wt, bt, labels, label_mask, kl_mask, options, ce_scale, kl_scale, need, chunk_size,
            epilogue,
        )
        loss, ce, kl = combine(ce_rows, div_rows, denom, options)
        ctx.options, ctx.chunk_size, ctx.need, ctx.eager, ctx.epilogue = options, chunk_size, need, eager, epilogue
        if eager:
            ctx.grads = grads
        elif any(need):
            ctx.save_for_backward(h, W, b, ht, Wt, bt, labels, label_mask, kl_mask, denom)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        if ctx.eager:
            g = ctx.grads
            ctx.grads = None
            # The gradients were formed for an upstream gradient of 1 and are ours to scale.
            # grad_loss stays float32 (a loss scale of 65536 overflows float16).
            d_h, d_w, d_b = (None if t is None else t.mul_(grad_loss) for t in g)
        else:
            h, W, b, ht, Wt, bt, labels, label_mask, kl_mask, denom = ctx.saved_tensors
            ce_scale, kl_scale = row_scales(grad_loss, denom, label_mask, kl_mask, ctx.options)
            _, _, (d_h, d_w, d_b) = chunked_sdft(
                h, W, b, ht, Wt, bt, labels, label_mask, kl_mask, ctx.options,
                ce_scale, kl_scale, ctx.need, ctx.chunk_size, ctx.epilogue,
            )
        return d_h, d_w, d_b, None, None, None, None, None, None, None, None, None, None
