"""Training steps of the SDFT loss under FSDP2 (``fully_shard``) in a world of one process,
each checked against the same step unsharded.

    python -m bench.memory.fsdp_step --device cuda    # NCCL; prints one line FSDP_RESULT {json}
    python -m bench.memory.fsdp_step --device cpu     # gloo, a tiny model (what the tests run)

The student is a Llama-shaped model of :mod:`bench.train_step.cases` with random weights,
the teacher ``FrozenCopy`` of it as built, the student moved a little away from it. The
same student is copied before sharding; the copy's step (``SDFTModel(copy, teacher)``, no
wrapper) is the oracle. Three ways to the sharded step, over a one-process device mesh
(``torch.distributed`` with a world of one, through an in-memory store: no port), the teacher
sharded too (:func:`sdft.sharding.fully_shard_teacher`):

- ``sdft_model``: every decoder layer and then the whole ``SDFTModel`` under ``fully_shard``;
  a forward, a backward and an AdamW step;
- ``plain``: the student under ``fully_shard`` (layers, then the student), the loss through
  its forward (``causal_lm_loss(student, batch, teacher, wrapper=student)``);
- ``trainer`` (CUDA only: accelerate sets FSDP up on GPUs only): ``sdft.trainer.build_trainer``
  with ``TrainingArguments(fsdp=True)`` (FSDP2 through accelerate, bf16), one optimizer step,
  then the final model gathered whole as ``sdft train`` saves it; its first logged loss
  against the oracle's under the same autocast.

Each loss and LM head gradient must equal the oracle's within the dtype's rounding. The
record's top level is the ``sdft_model`` way; ``variants`` holds each way's.

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
from pathlib import Path

import torch

RESULT_MARKER = "FSDP_RESULT "
# Per device: the model (bench.train_step.cases), its dtype, the batch (sequences, tokens).
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
    """The steps described in the module docstring; a JSON-able record."""
    model_name, dtype_name, (sequences, seq_len) = SETTINGS[device]
    result = {"device": device, "model": model_name, "dtype": dtype_name,
              "sequences": sequences, "seq_len": seq_len, "status": "ok", "reason": None}
    try:
        _fully_shard()
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
    except ImportError as e:
        return dict(result, status="skipped", reason=f"torch {torch.__version__} has no "
                    f"FSDP2 fully_shard: {e}")
    variants = {}
    for way in ("sdft_model", "plain"):
        variants[way] = _guarded(dict(result), lambda record: _wrapped_step(device, way, record))
    if device == "cuda":
        variants["trainer"] = _guarded(dict(result), lambda record: _trainer_step(record))
    result.update({k: v for k, v in variants["sdft_model"].items()})
    result["variants"] = variants
    bad = [f"{way}: {v['status']}" for way, v in variants.items() if v["status"] != "ok"]
    if bad and result["status"] == "ok":
        result.update(status=next(v["status"] for v in variants.values() if v["status"] != "ok"),
                      reason="; ".join(f"{way}: {v['reason']}" for way, v in variants.items() if v["status"] != "ok"))
    return result


def _guarded(record: dict, run) -> dict:
    """``run(record)``, its failures recorded (see the module docstring's outcomes)."""
    import torch.distributed as dist

    try:
        run(record)
    except ValueError as e:
        refused = "fsdp" in str(e).lower()
        record.update(status="refused" if refused else "error", reason=f"ValueError: {e}")
        if not refused:
            record["traceback"] = traceback.format_exc(limit=8)
    except Exception as e:  # noqa: BLE001 - the result says what happened
        record.update(status="error", reason=f"{type(e).__name__}: {str(e)[:500]}",
                      traceback=traceback.format_exc(limit=8))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return record


def _setup(device: str):
    """The student, its teacher, the loss, the batch and the oracle: (loss, LM head gradient)."""
    from sdft import SDFTLoss, SDFTModel
    from sdft.teacher import FrozenCopy

    from ..loss.inputs import LAMBDA, SEED, TAU
    from ..train_step.cases import build_model, make_batch, model_by_name, move_away

    model_name, dtype_name, (sequences, seq_len) = SETTINGS[device]
    dtype = getattr(torch, dtype_name)
    spec = model_by_name(model_name)
    batch = make_batch(spec.vocab, sequences, seq_len, device, SEED)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    student = build_model(spec, seq_len, device, dtype, SEED)
    teacher = FrozenCopy(student)
    move_away(student.parameters(), SEED, student.config.initializer_range)
    oracle_student = copy.deepcopy(student)
    loss = SDFTLoss(kl_weight=LAMBDA, temperature=TAU)
    oracle = SDFTModel(oracle_student, teacher, loss)(**inputs).loss
    oracle.backward()
    return student, teacher, loss, inputs, (oracle.detach(), oracle_student.lm_head.weight.grad)


def _compare(record: dict, loss: torch.Tensor, grad, oracle, dtype_name: str) -> None:
    oracle_loss, oracle_grad = oracle
    record.update(loss=float(loss), oracle_loss=float(oracle_loss),
                  loss_rel_err=abs(float(loss) - float(oracle_loss)) / abs(float(oracle_loss)))
    if grad is not None:
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        record["grad_rel_err"] = _rel(grad, oracle_grad)
    loss_tol, grad_tol = TOLERANCE[dtype_name]
    record["tolerance"] = {"loss": loss_tol, "grad": grad_tol}
    if not (record["loss_rel_err"] <= loss_tol and record.get("grad_rel_err", 0.0) <= grad_tol):
        record.update(status="failed", reason=(
            f"the sharded step differs from the unsharded one: loss rel. err {record['loss_rel_err']:.2e} "
            f"(<= {loss_tol:g}), LM head gradient rel. err {record.get('grad_rel_err', float('nan')):.2e} "
            f"(<= {grad_tol:g})"))


def _wrapped_step(device: str, way: str, record: dict) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from sdft import SDFTModel, integration
    from sdft.sharding import fully_shard_layers, fully_shard_teacher

    from ..train_step.cases import LEARNING_RATE

    t0 = time.perf_counter()
    if device == "cuda":  # before the process group: NCCL binds to the current device
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    student, teacher, loss_fn, inputs, oracle = _setup(device)
    mesh = init_device_mesh(device, (1,))
    fully_shard_teacher(teacher, mesh=mesh)
    if way == "sdft_model":
        model = fully_shard_layers(SDFTModel(student, teacher, loss_fn), mesh=mesh)
        out = model(**inputs).loss
    else:
        model = fully_shard_layers(student, mesh=mesh)
        out = integration.causal_lm_loss(student, inputs, teacher, loss_fn, wrapper=student).loss
    record["wrapped_as"] = type(model).__name__
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    out.backward()
    grad = student.lm_head.weight.grad
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    record["seconds"] = time.perf_counter() - t0
    _compare(record, out.detach(), grad, oracle, record["dtype"])


def _trainer_step(record: dict) -> None:
    """SDFTTrainer with accelerate's FSDP2 in a world of one GPU (see the module docstring)."""
    import os
    import socket
    import tempfile

    from datasets import Dataset
    from transformers import TrainingArguments

    from sdft.recipe import save_result
    from sdft.trainer import build_trainer

    with socket.socket() as sock:  # accelerate's process group: a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    t0 = time.perf_counter()
    torch.cuda.set_device(0)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the oracle under the trainer's autocast
        student, teacher, loss_fn, inputs, oracle = _setup("cuda")
    rows = [{k: v[i].tolist() for k, v in inputs.items()} for i in range(inputs["input_ids"].shape[0])]

    def collate(examples):
        return {k: torch.tensor([ex[k] for ex in examples]) for k in examples[0]}

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, fsdp=True, fsdp_config={"version": 2}, bf16=True,
                                 per_device_train_batch_size=len(rows), max_steps=1, learning_rate=1e-5,
                                 lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no",
                                 remove_unused_columns=False)
        trainer = build_trainer(student, args, Dataset.from_list(rows), collate, teacher=teacher, loss=loss_fn,
                                check_head=True)
        record["teacher_sharded"] = teacher.wrapper is not None
        trainer.train()
        record["wrapped_as"] = type(trainer.model_wrapped).__name__
        save_result(trainer, student, _NoTokenizer(), Path(out) / "final")
        record["saved_files"] = sorted(p.name for p in (Path(out) / "final").iterdir())
    first = next(entry for entry in trainer.state.log_history if "loss" in entry)
    record["seconds"] = time.perf_counter() - t0
    _compare(record, torch.tensor(first["loss"]), None, oracle, "bfloat16")
    if not record["teacher_sharded"]:
        record.update(status="failed", reason="the FrozenCopy teacher was not sharded under FSDP")


class _NoTokenizer:
    def save_pretrained(self, folder) -> None:
        pass


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
