"""Does a contender compute the reference's loss and gradients? Checked before it is timed.

What is compared, per case:

- the loss: relative error ``|loss - loss_ref| / |loss_ref|``;
- each gradient G (of hidden ``[N, D]`` and of the weight ``[V, D]``) through two numbers:
  its Frobenius norm and a random bilinear probe ``u^T G v`` with fixed Gaussian ``u``, ``v``.
  For ``G = G_ref + E`` the probe moves by ``u^T E v``, which has standard deviation
  ``||E||_F``; so ``|probe - probe_ref| / ||G_ref||_F`` estimates the relative error
  ``||E||_F / ||G_ref||_F`` without keeping (or shipping between processes) a second copy
  of a ``[V, D]`` gradient. The reported gradient error is the larger of the two.

The oracle is the materialised reference at the same dtype. Where its full ``[N, V]`` logits
do not fit, :func:`blocked_oracle` runs the same reference over row blocks (the loss is a sum
over rows) and accumulates the gradients.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .inputs import IGNORE_INDEX, LAMBDA, TAU, Inputs
from .shapes import CE_FWD_BWD, FWD

# (loss rtol, gradient rtol) per dtype. bf16 logits carry ~3 significant digits, and peers
# differ in where they round, so half precision gets room that float32 does not need.
TOLERANCES = {
    torch.float32: (1e-4, 1e-3),
    torch.float64: (1e-8, 1e-6),
    torch.bfloat16: (1e-2, 5e-2),
    torch.float16: (5e-3, 2e-2),
}
_PROBE_SEED = 99
_PROBE_BLOCK_BYTES = 256 * 2**20


def _probe(G: Tensor) -> dict:
    """``{"probe": u^T G v, "norm": ||G||_F}`` in float64, in row blocks of float32."""
    rows, cols = G.shape
    g = torch.Generator(device=G.device).manual_seed(_PROBE_SEED)
    u = torch.randn(rows, generator=g, device=G.device, dtype=torch.float32)
    v = torch.randn(cols, generator=g, device=G.device, dtype=torch.float32)
    step = max(1, _PROBE_BLOCK_BYTES // (4 * cols))
    probe = torch.zeros((), dtype=torch.float64, device=G.device)
    norm2 = torch.zeros((), dtype=torch.float64, device=G.device)
    for s in range(0, rows, step):
        block = G[s:s + step].float()
        probe += (u[s:s + step] @ (block @ v)).double()
        norm2 += block.double().square().sum()
    return {"probe": float(probe), "norm": float(norm2.sqrt())}


def values_of(loss: Tensor, inputs: Inputs, backward: bool) -> dict:
    """What agreement compares: the loss and, after a backward, the two gradient probes."""
    out = {"loss": float(loss.float())}
    if backward:
        for name, leaf in (("grad_hidden", inputs.hidden), ("grad_weight", inputs.weight)):
            out[name] = None if leaf.grad is None else _probe(leaf.grad)
    return out


def _grad_error(got: Optional[dict], ref: dict) -> Optional[float]:
    """Relative gradient error; None when the contender produced no gradient (disagrees)."""
    if got is None or not (math.isfinite(got["probe"]) and math.isfinite(got["norm"])):
        return None
    scale = max(ref["norm"], 1e-30)
    return max(abs(got["probe"] - ref["probe"]), abs(got["norm"] - ref["norm"])) / scale


def compare(values: dict, oracle: dict, dtype: torch.dtype) -> dict:
    """Errors against the oracle and whether they are within this dtype's tolerances."""
    tol_loss, tol_grad = TOLERANCES[dtype]
    # Non-finite values are recorded as None (strict JSON) and never agree.
    loss_err = None
    if math.isfinite(values["loss"]):
        loss_err = abs(values["loss"] - oracle["loss"]) / max(abs(oracle["loss"]), 1e-30)
    out = {"loss": values["loss"] if math.isfinite(values["loss"]) else None,
           "loss_ref": oracle["loss"], "loss_rel_err": loss_err,
           "tol_loss": tol_loss, "tol_grad": tol_grad}
    ok = loss_err is not None and loss_err <= tol_loss
    for name in ("grad_hidden", "grad_weight"):
        if name in oracle:
            err = _grad_error(values.get(name), oracle[name])
            out[f"{name}_rel_err"] = err
            ok = ok and err is not None and err <= tol_grad
    out["agrees"] = bool(ok)
    return out


def blocked_oracle(inputs: Inputs, group: str, budget_bytes: int) -> dict:
    """The reference's values computed over row blocks of at most ``budget_bytes`` of logits.

    The mean loss is ``sum over rows / labelled count``, so per-block sums divided by the
    global count add up to it exactly (up to summation order); the gradients accumulate.
    """
    from sdft_kernels import fused_linear_sdft_loss

    N, V = inputs.hidden.shape[0], inputs.weight.shape[0]
    # ~8 float32 [rows, V] buffers are alive in the reference's forward and backward.
    step = max(1, budget_bytes // (8 * 4 * V))
    count = max(inputs.n_labelled, 1)
    teacher = group != CE_FWD_BWD
    backward = group != FWD
    inputs.zero_grads()
    total = torch.zeros((), dtype=torch.float64, device=inputs.hidden.device)
    with torch.set_grad_enabled(backward):
        for s in range(0, N, step):
            block = slice(s, min(s + step, N))
            loss = fused_linear_sdft_loss(
                inputs.hidden[block], inputs.weight, inputs.labels[block],
                inputs.teacher_hidden[block] if teacher else None,
                inputs.teacher_weight if teacher else None,
                kl_weight=LAMBDA, temperature=TAU, ignore_index=IGNORE_INDEX,
                reduction="sum", impl="reference",
            ) / count
            if backward:
                loss.backward()
            total += loss.detach().double()
    values = values_of(total, inputs, backward)
    inputs.zero_grads()
    return values
