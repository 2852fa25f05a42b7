"""One training step of an ``SDFTModel`` under FSDP2 (``fully_shard``) in a world of one
process, checked against the same step unsharded.

    python -m bench.fsdp_step --device cuda    # NCCL; prints one line FSDP_RESULT {json}
    python -m bench.fsdp_step --device cpu     # gloo, a tiny model (what the tests run)

The student is a Llama-shaped model of :mod:`bench.train_step_cases` with random weights,
the teacher ``FrozenCopy`` of it as built, the student moved a little away from it. The
same student is copied before sharding; the copy's step (``SDFTModel(copy, teacher)``, no
wrapper) is the oracle. The sharded one has every decoder layer and then the whole
``SDFTModel`` wrapped by ``fully_shard`` over a one-process device mesh (``torch.distributed``
with a world of one, through an in-memory store: no port), and takes a forward, a backward
and an AdamW step. Its loss and its LM head's gradient must equal the oracle's within the
dtype's rounding.

Outcomes (``status``): "ok" (they agree), "failed" (they do not), "refused" (the library
raised a ValueError that names FSDP: its message is the result), "skipped" (this torch has
no ``fully_shard``), "error" (anything else, with its traceback).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback

import torch

RESULT_MARKER = "FSDP_RESULT "
# Per device: the model (bench.train_step_cases), its dtype, the batch (sequences, tokens).
SETTINGS = {"cuda": ("qwen-vocab", "bfloat16", (4, 512)), "cpu": ("tiny", "float32", (2, 32))}
# Largest relative difference from the unsharded step allowed (loss, LM head gradient): a
# world of one reduces nothing, so only the order of float operations may differ.
TOLERANCE = {"bfloat16": (1e-2, 2e-2), "float32": (1e-5, 1e-4)}


def _fully_shard():
    """FSDP2's ``fully_shard`` (public in torch >= 2.6, composable API before)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def fsdp_step(device: str) -> dict:
    """The step described in the module docstring; a JSON-able record."""
    model_name, dtype_name, (sequences, seq_len) = SETTINGS[device]
    result = {"device": device, "model": model_name, "dtype": dtype_name,
              "sequences": sequences, "seq_len": seq_len, "status": "ok", "reason": None}
    try:
        fully_shard = _fully_shard()
        from torch.distributed.device_mesh import init_device_mesh
    except ImportError as e:
        return dict(result, status="skipped", reason=f"torch {torch.__version__} has no "
                    f"FSDP2 fully_shard: {e}")
    import torch.distributed as dist

    from sdft import SDFTLoss, SDFTModel
    from sdft.teacher import FrozenCopy

    from .inputs import LAMBDA, SEED, TAU
    from .train_step_cases import (LEARNING_RATE, build_model, make_batch, model_by_name,
                                   move_away)

    dtype = getattr(torch, dtype_name)
    spec = model_by_name(model_name)
    batch = make_batch(spec.vocab, sequences, seq_len, device, SEED)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    t0 = time.perf_counter()
    try:
        if device == "cuda":  # before the process group: NCCL binds to the current device
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
        student = build_model(spec, seq_len, device, dtype, SEED)
        teacher = FrozenCopy(student)
        move_away(student.parameters(), SEED, student.config.initializer_range)
        oracle_student = copy.deepcopy(student)
        loss = SDFTLoss(kl_weight=LAMBDA, temperature=TAU)

        oracle = SDFTModel(oracle_student, teacher, loss)(**inputs).loss
        oracle.backward()
        oracle = oracle.detach()
        oracle_grad = oracle_student.lm_head.weight.grad

        mesh = init_device_mesh(device, (1,))
        model = SDFTModel(student, teacher, loss)
        for layer in student.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        result["wrapped_as"] = type(model).__name__
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
        out = model(**inputs).loss
        out.backward()
        out = out.detach()
        grad = student.lm_head.weight.grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        result.update(loss=float(out), oracle_loss=float(oracle),
                      loss_rel_err=abs(float(out) - float(oracle)) / abs(float(oracle)),
                      grad_rel_err=_rel(grad, oracle_grad), seconds=time.perf_counter() - t0)
        loss_tol, grad_tol = TOLERANCE[dtype_name]
        result["tolerance"] = {"loss": loss_tol, "grad": grad_tol}
        if not (result["loss_rel_err"] <= loss_tol and result["grad_rel_err"] <= grad_tol):
            result.update(status="failed", reason=(
                f"the sharded step differs from the unsharded one: loss rel. err "
                f"{result['loss_rel_err']:.2e} (<= {loss_tol:g}), LM head gradient rel. err "
                f"{result['grad_rel_err']:.2e} (<= {grad_tol:g})"))
    except ValueError as e:
        refused = "fsdp" in str(e).lower()
        result.update(status="refused" if refused else "error", reason=f"ValueError: {e}")
        if not refused:
            result["traceback"] = traceback.format_exc(limit=8)
    except Exception as e:  # noqa: BLE001 - the result says what happened
        result.update(status="error", reason=f"{type(e).__name__}: {str(e)[:500]}",
                      traceback=traceback.format_exc(limit=8))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=tuple(SETTINGS), default="cuda")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    print(RESULT_MARKER + json.dumps(fsdp_step(args.device)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
