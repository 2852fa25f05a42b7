"""Memory per process of an SDFT step under each wrapper: what each process holds between
steps (the student's weights, gradients and AdamW state, the teacher's weights), measured at
a tiny size on a CPU and predicted by the same formula for Llama-3-8B.

    torchrun --nproc_per_node 2 -m bench.memory.sharded_memory [--out FILE.json]   # measure (gloo)
    python -m bench.memory.sharded_memory --predict [--world 8]                    # Llama-3-8B

Measured: the bytes of the tensors each process holds after one step of ``SDFTModel(student,
FrozenCopy teacher)`` (the float32 Llama-shaped model ``tiny-wide`` below), by what holds them:
DDP (everything replicated), FSDP2 (``fully_shard`` per decoder layer and the root) with the
teacher replicated or sharded (:func:`sdft.sharding.fully_shard_teacher`: its head then whole
on every process), FSDP1 ``FULL_SHARD`` (``use_orig_params``), and DeepSpeed ZeRO-3 where it is
installed (its partitions: ``ds_tensor``, the optimizer's float32 partition, gradients and
AdamW moments). Predicted: :func:`predict`, the formula of the README's table. Transient
memory (a unit's parameters while gathered, activations) is not counted here: the README
gives it per wrapper.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# A Llama shape small enough for two CPU processes, with a head as large as its layers.
TINY = dict(vocab=8192, hidden=128, intermediate=344, layers=4, heads=4)
LLAMA3_8B = dict(vocab=128256, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8)
SETUPS = ("ddp", "fsdp2_replicated_teacher", "fsdp2", "fsdp1", "zero3")


def parameter_count(vocab, hidden, intermediate, layers, heads, kv_heads=None, **_) -> dict:
    """Parameters of a Llama (untied embeddings and head): ``head`` (V x D), ``embed`` (V x D),
    ``layers`` (attention with grouped KV heads, the gated MLP, two norms each), ``norm``."""
    kv = hidden * (kv_heads or heads) // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    return {"embed": vocab * hidden, "head": vocab * hidden, "layers": layers * per_layer, "norm": hidden}


def predict(setup: str, shape: dict, world: int, weight_bytes: int = 4, teacher_bytes: int = 4) -> dict:
    """Bytes per process between steps: ``weights`` (the student's, in ``weight_bytes``),
    ``grads`` (as the weights), ``adam`` (two float32 moments), ``teacher`` (its weights in
    ``teacher_bytes``, and for a sharded teacher its whole head), and ``total``. FSDP and ZeRO-3
    divide the student's by ``world``; ZeRO-3 also keeps a float32 master partition beside
    its weights (``master``)."""
    counts = parameter_count(**shape)
    P = sum(counts.values())
    sharded = setup != "ddp"
    share = world if sharded else 1
    out = {"weights": P * weight_bytes / share, "grads": P * weight_bytes / share, "adam": 8 * P / share}
    if setup == "zero3":
        out["master"] = 4 * P / share
    if setup in ("ddp", "fsdp2_replicated_teacher"):
        out["teacher"] = P * teacher_bytes
    else:
        out["teacher"] = P * teacher_bytes / world + counts["head"] * teacher_bytes
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------------------------- measuring

def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None:
            continue
        tensor = _local(tensor)
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen and tensor.numel():
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _adam_bytes(optimizer) -> int:
    return _bytes(value for state in optimizer.state.values() for key, value in state.items()
                  if key != "step" and torch.is_tensor(value))


def measure(setup: str) -> dict:
    """One step of the setup in this process group; the bytes this process holds."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from sdft import SDFTLoss, SDFTModel
    from sdft.sharding import fully_shard_layers, fully_shard_teacher
    from sdft.teacher import FrozenCopy

    from ..train_step.cases import StepModel, build_model, make_batch

    spec = StepModel("tiny-wide", "", layers=TINY["layers"], hidden=TINY["hidden"],
                     intermediate=TINY["intermediate"], heads=TINY["heads"], vocab=TINY["vocab"])
    student = build_model(spec, 64, "cpu", torch.float32, seed=0)
    teacher = FrozenCopy(student)
    world, rank = dist.get_world_size(), dist.get_rank()
    batch = make_batch(spec.vocab, 2, 32, "cpu", seed=rank)
    batch.pop("id")
    model = SDFTModel(student, teacher, SDFTLoss(kl_weight=1.0, temperature=0.5))
    optimizer = None
    if setup == "ddp":
        wrapper = torch.nn.parallel.DistributedDataParallel(model)
    elif setup.startswith("fsdp2"):
        if setup == "fsdp2":
            fully_shard_teacher(teacher, mesh=init_device_mesh("cpu", (world,)))
        wrapper = fully_shard_layers(model, mesh=init_device_mesh("cpu", (world,)))
    elif setup == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        fully_shard_teacher(teacher, mesh=init_device_mesh("cpu", (world,)))  # FSDP2 for the frozen teacher
        wrapper = FullyShardedDataParallel(model, sharding_strategy=ShardingStrategy.FULL_SHARD,
                                           auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                           device_id=torch.device("cpu"), use_orig_params=True)
    else:
        import deepspeed

        from sdft.sharding import deepspeed_teacher

        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {
            "stage": 3, "stage3_param_persistence_threshold": 0}, "zero_allow_untested_optimizer": True}
        deepspeed_teacher(teacher, config)
        wrapper, optimizer, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                                      config=config)
    if optimizer is None:
        optimizer = torch.optim.AdamW(wrapper.parameters(), lr=1e-5)
    loss = wrapper(**batch).loss
    teacher_tensors = list(teacher.model.parameters()) + [teacher.head.weight if teacher.head else None]
    if setup == "zero3":
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_get_local_optimizer_state

        wrapper.backward(loss)
        params = list(model.parameters())
        grads = _bytes(safe_get_local_grad(p) for p in params)
        wrapper.step()
        out = {"weights": _bytes(p.ds_tensor for p in params),
               "master": _bytes(safe_get_local_fp32_param(p) for p in params),
               "grads": grads,
               "adam": _bytes(safe_get_local_optimizer_state(p, key) for p in params for key in ("exp_avg", "exp_avg_sq")),
               "teacher": _bytes(getattr(p, "ds_tensor", p) for p in teacher.model.parameters())
               + _bytes([teacher.head.weight])}
    else:
        loss.backward()
        params = list(wrapper.parameters())
        grads = _bytes(p.grad for p in params)
        optimizer.step()
        out = {"weights": _bytes(params), "grads": grads, "adam": _adam_bytes(optimizer),
               "teacher": _bytes(teacher_tensors)}
    out["total"] = sum(out.values())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--predict", action="store_true", help="print the Llama-3-8B prediction and exit")
    p.add_argument("--world", type=int, default=8, help="processes for --predict")
    p.add_argument("--out", type=Path, help="write the measurements (and predictions) as JSON")
    args = p.parse_args(argv)
    if args.predict:
        for setup in SETUPS:
            row = predict(setup, LLAMA3_8B, args.world, weight_bytes=4, teacher_bytes=2)
            print(setup, {k: f"{v / 2**30:.1f} GiB" for k, v in row.items()})
        return 0
    import importlib.util

    import torch.distributed as dist

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    setups = [s for s in SETUPS if s != "zero3" or importlib.util.find_spec("deepspeed") is not None]
    if "zero3" in setups:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    rows = {}
    for setup in setups:
        measured = measure(setup)
        rows[setup] = {"measured": measured, "predicted": predict(setup, TINY, world)}
        if dist.get_rank() == 0:
            print(setup, json.dumps(rows[setup]), flush=True)
    if dist.get_rank() == 0 and args.out is not None:
        rows["meta"] = {"world": world, "tiny": TINY, "torch": torch.__version__,
                        "parameters": parameter_count(**TINY)}
        args.out.write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
