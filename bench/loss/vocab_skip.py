"""Could a backward skip the vocabulary its gradient does not reach, and stay as accurate as the dense one?

A trained model's logit gradient is mostly tiny entries: per row, 81 % of SmolLM2-135M's lie
below float32 resolution times the row's largest (``python -m bench.loss.real_inputs``). A
backward that skips a ``[rows x vocab]`` block of its two gradient GEMMs (grad of hidden
``G W``, grad of head ``G^T h``) wherever the block's largest ``|G|`` is below ``r`` times its
chunk's largest drops those entries; the forward (loss, metrics) stays exact. This measures on
SmolLM2-135M-Instruct's final hidden states over real text, per block shape and threshold
``r``: the share of the gradient that remains, and both gradients' errors against the dense
float64 gradient (norm-wise and worst entry, relative to scale), beside the dense float32 and
bfloat16 paths' own errors: a skip is worth timing only where it keeps within those.

    python -m bench.loss.vocab_skip            # bench/results/vocab-skip-cpu-<date>.json and .md

The teacher is the model itself, as at the first step of stage 2, so the gradient is the
cross-entropy's (a later student's divergence term adds entries of the teacher's support, which
at tau 0.5 is narrower still). No timing: the numbers do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..driver.files import RESULTS_DIR, write_json_atomic
from ..driver.loop import results_path, today
from .real_inputs import CACHE, real_hidden_states

THRESHOLDS_LOG2 = (-24, -20, -16, -14, -12)
BLOCKS = ((256, 1), (256, 128), (64, 64), (16, 16))  # (rows, vocabulary entries) per skipped block


def relative_errors(got: Tensor, truth: Tensor) -> dict[str, float]:
    """``{"norm": |got - truth| / |truth|, "max": max |got - truth| / max |truth|}``."""
    diff = got.double() - truth
    return {"norm": float(diff.norm() / truth.norm()), "max": float(diff.abs().max() / truth.abs().max())}


def ce_logit_gradient(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """``d mean CE / d logits`` ``[N, V]`` in float64, from ``hidden [N, D]``, ``weight [V, D]``,
    ``labels [N]`` (all counted)."""
    g = (hidden.double() @ weight.double().T).softmax(-1)
    g[torch.arange(labels.numel()), labels] -= 1.0
    return g.div_(labels.numel())


def kept_blocks(g: Tensor, rows: int, cols: int, r: float) -> Tensor:
    """``[N, V]`` bool: True on the entries of the blocks of ``rows x cols`` a skipping backward
    keeps, those whose largest ``|g|`` is at least ``r`` times the largest ``|g|`` of their
    ``rows`` rows (the scale a chunked kernel knows when it decides)."""
    N, V = g.shape
    keep = torch.empty(N, V, dtype=torch.bool)
    pad = (-V) % cols
    for s in range(0, N, rows):
        a = g[s:s + rows].abs()
        n = a.shape[0]
        blocks = F.pad(a, (0, pad)).view(n, -1, cols).amax(2).amax(0, keepdim=True)  # [1, V / cols]
        keep[s:s + rows] = (blocks >= r * a.max()).repeat_interleave(cols, dim=1)[:, :V]
    return keep


def _dense_errors(h: Tensor, W: Tensor, y: Tensor, dtype: torch.dtype, truth=None) -> dict:
    """The dense backward with ``dtype`` factors (float32 sums) against the float64 gradients of
    the same, rounded, inputs (``truth`` when given: the inputs are not rounded)."""
    h_r, W_r = h.to(dtype), W.to(dtype)
    if truth is None:
        G = ce_logit_gradient(h_r, W_r, y)
        truth = (G @ W_r.double(), G.T @ h_r.double())
    else:
        G = ce_logit_gradient(h, W, y)
    g = G.to(dtype).float()
    return {"grad_hidden": relative_errors(g @ W_r.float(), truth[0]),
            "grad_head": relative_errors(g.T @ h_r.float(), truth[1])}


def study(n_tokens: int = 2048, cache_dir: Optional[Path] = CACHE) -> dict:
    """The dense paths' errors and, per block shape and threshold, the share kept and the errors."""
    real = real_hidden_states(n_tokens, cache_dir=cache_dir)
    h, W, y = real.hidden, real.weight, real.labels
    G = ce_logit_gradient(h, W, y)
    h64, W64 = h.double(), W.double()
    truth = (G @ W64, G.T @ h64)
    dense = {"float32": _dense_errors(h, W, y, torch.float32, truth),
             "bfloat16": _dense_errors(h, W, y, torch.bfloat16)}
    skips = []
    for rows, cols in BLOCKS:
        for r_log2 in THRESHOLDS_LOG2:
            keep = kept_blocks(G, rows, cols, 2.0 ** r_log2)
            kept_g = torch.where(keep, G, 0.0)
            skips.append({"block": [rows, cols], "r_log2": r_log2, "kept": float(keep.double().mean()),
                          "grad_hidden": relative_errors(kept_g @ W64, truth[0]),
                          "grad_head": relative_errors(kept_g.T @ h64, truth[1])})
            del keep, kept_g
    return {"n_tokens": n_tokens, "vocab": W.shape[0], "hidden": W.shape[1], "dense": dense, "skips": skips}


def _within(errors: dict, dense: dict) -> bool:
    return all(errors[g][k] <= dense[g][k] for g in ("grad_hidden", "grad_head") for k in ("norm", "max"))


def best_within(result: dict, dtype: str) -> Optional[dict]:
    """The skip keeping the least of the gradient while within the dense ``dtype`` path's errors."""
    ok = [s for s in result["skips"] if _within(s, result["dense"][dtype])]
    return min(ok, key=lambda s: s["kept"]) if ok else None


def format_study(result: dict) -> str:
    e = lambda d: " | ".join(f"{d[g][k]:.2e}" for g in ("grad_hidden", "grad_head") for k in ("norm", "max"))  # noqa: E731
    lines = [
        "# Skipping the vocabulary in the backward: what remains, what it costs in accuracy",
        "",
        f"SmolLM2-135M-Instruct's final hidden states over {result['n_tokens']} positions of GeoNames text, "
        f"V={result['vocab']}, D={result['hidden']}; the cross-entropy's logit gradient (the teacher is the model "
        "itself, as at the first step of stage 2). A block is skipped when its largest |gradient| is below "
        "r times its chunk's largest. Errors of both gradients against the dense float64 gradients, relative to "
        "their scale: norm-wise and worst entry.",
        "",
        "| backward | kept | grad hidden, norm | grad hidden, max | grad head, norm | grad head, max |",
        "|---|---:|---:|---:|---:|---:|",
        f"| dense, float32 | 100% | {e(result['dense']['float32'])} |",
        f"| dense, bfloat16 factors (against the rounded inputs' float64 truth) | 100% | "
        f"{e(result['dense']['bfloat16'])} |",
    ]
    for s in result["skips"]:
        lines.append(f"| skip {s['block'][0]}x{s['block'][1]} blocks, r = 2^{s['r_log2']} | {s['kept']:.1%} | {e(s)} |")
    lines += ["", "Least kept within each dense path's own errors:", ""]
    for dtype in ("float32", "bfloat16"):
        b = best_within(result, dtype)
        lines.append(f"- {dtype}: " + ("nothing skips: every block shape and threshold that leaves anything out "
                                       "exceeds them" if b is None or b["kept"] >= 1.0 else
                                       f"{b['block'][0]}x{b['block'][1]} blocks at r = 2^{b['r_log2']}, "
                                       f"{b['kept']:.1%} of the gradient kept"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="positions of real text (default 2048)")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    result = study(args.tokens)
    result["command"] = "python -m bench.loss.vocab_skip" + (f" --tokens {args.tokens}" if args.tokens != 2048 else "")
    stem = results_path(args.out, f"vocab-skip-cpu-{today()}").with_suffix("")
    write_json_atomic(stem.with_suffix(".json"), result)
    stem.with_suffix(".md").write_text(format_study(result))
    print(format_study(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
