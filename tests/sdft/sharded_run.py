"""Training steps of a tiny student under a sharding wrapper, for ``test_sharding.py``.

Usage: ``torchrun --nproc_per_node=2 -m tests.sdft.sharded_run SETTINGS_JSON OUT_DIR``, with
settings ``{"phase": "kill" | "resume", "cases": {NAME: CASE, ...}}``, each case run in turn in
the same processes, into ``OUT_DIR/NAME``:

- ``kill``: step 1, a sharded checkpoint; once every case is there, both processes kill
  themselves in the middle of the next step;
- ``resume``: each case from its checkpoint, step 2.

A case (a JSON object):

- ``wrapper``: ``fsdp2`` (every decoder layer, then the root, under ``fully_shard``),
  ``fsdp2_offload`` (the same with ``CPUOffloadPolicy``), ``fsdp2_head_unit`` (the LM head a
  unit of its own as well), ``fsdp1`` (``FullyShardedDataParallel`` ``FULL_SHARD``, a unit per
  decoder layer), ``zero3`` (a DeepSpeed ZeRO-3 engine, nothing kept whole: persistence
  threshold 0);
- ``form``: ``sdft_model`` (the wrapper around ``SDFTModel(student, teacher, loss)``) or
  ``plain`` (the wrapper around the student, ``causal_lm_loss(..., wrapper=...)``);
- ``teacher``: ``sharded`` (a ``FrozenCopy`` sharded as the wrapper shards: FSDP2 or its own
  ZeRO-3 engine), ``replicated`` (a plain ``FrozenCopy``), ``adapter`` (a LoRA student, the
  base model with the adapters off), ``cache`` (a ``HiddenStateCache`` built beforehand);
- ``dtype``: ``float64`` or ``float32``.

Each step is two micro-batches of two rows per process (gradient accumulation; no gradient
sync on the first where the wrapper allows), normalised by the target count of the whole
step over all processes. Rank 0 writes ``result-<phase>.json`` (the step's loss summed over
micro-batches and processes), ``step1-grads.pt`` (every gradient of step 1, whole) and
``weights.pt`` (the whole state dict after step 2).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sdft import SDFTLoss, SDFTModel, causal_lm_loss
from sdft.sharding import deepspeed_teacher, full_state_dict, fully_shard_layers, fully_shard_teacher
from sdft.teacher import AdapterDisabled, FrozenCopy, HiddenStateCache
from sdft.trainer import count_loss_targets
from tests.sdft.tiny_models import make_batch, perturbed_copy, tiny_model

KL_WEIGHT, TAU, LR, MOMENTUM = 0.7, 0.5, 0.1, 0.9
ROWS_PER_STEP, MICRO_BATCHES = 8, 2


def all_rows():
    """Two steps' rows: ragged lengths, padding, unsupervised prompts, a row without targets."""
    batch = make_batch(B=2 * ROWS_PER_STEP, T=9, seed=3)
    batch["id"] = torch.arange(2 * ROWS_PER_STEP)
    return batch


def micro_batch(rows, step: int, micro: int, rank: int, world: int) -> dict:
    per = ROWS_PER_STEP // (MICRO_BATCHES * world)
    start = step * ROWS_PER_STEP + micro * per * world + rank * per
    return {k: v[start:start + per] for k, v in rows.items()}


def step_rows(rows, step: int) -> dict:
    return {k: v[step * ROWS_PER_STEP:(step + 1) * ROWS_PER_STEP] for k, v in rows.items()}


def optimizer(params):
    """SGD with momentum: a state to save and resume, and updates proportional to the gradients
    (so that float32 rounding stays small in the weights)."""
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def lora(model):
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    return peft.get_peft_model(model, config)


def models(settings):
    """The student (LoRA-wrapped for the adapter teacher) and the teacher's model, as the
    oracle builds them."""
    dtype = getattr(torch, settings["dtype"])
    student = tiny_model("llama", dtype=dtype)
    if settings["teacher"] == "adapter":
        return lora(student), None
    return student, perturbed_copy(student)


def zero3_config(settings) -> dict:
    return {"train_micro_batch_size_per_gpu": ROWS_PER_STEP // (MICRO_BATCHES * 2),
            "gradient_accumulation_steps": MICRO_BATCHES, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  "stage3_prefetch_bucket_size": 0, "reduce_bucket_size": 1e6},
            "zero_allow_untested_optimizer": True, "wall_clock_breakdown": False}


class Run:
    def __init__(self, settings, out: Path):
        self.settings, self.out = settings, out
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.kind = settings["wrapper"]
        self.rows = all_rows()
        student, teacher_model = models(settings)
        self.student = student
        self.teacher = self._teacher(student, teacher_model)
        self.loss = SDFTLoss(kl_weight=KL_WEIGHT, temperature=TAU)
        self.sdft = SDFTModel(student, self.teacher, self.loss) if settings["form"] == "sdft_model" else None
        self._wrap()

    def _teacher(self, student, teacher_model):
        kind = self.settings["teacher"]
        if kind == "adapter":
            return AdapterDisabled(student)
        if kind == "cache":
            path = self.out / "cache"
            if self.rank == 0 and not (path / "meta.json").exists():
                examples = [{"id": i, "input_ids": ids[mask.bool()].tolist()}
                            for i, (ids, mask) in enumerate(zip(self.rows["input_ids"], self.rows["attention_mask"]))]
                HiddenStateCache.build(teacher_model, examples, path, dtype=torch.float32)
            dist.barrier()
            return HiddenStateCache(path)
        teacher = FrozenCopy(teacher_model)
        if kind == "sharded":
            if self.kind == "zero3":
                deepspeed_teacher(teacher, zero3_config(self.settings))
            else:
                fully_shard_teacher(teacher, **self._fsdp2_kwargs())
        return teacher

    def _fsdp2_kwargs(self):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy

        kwargs = {"mesh": init_device_mesh("cpu", (self.world,))}
        if self.kind == "fsdp2_offload":
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=False)  # no accelerator to pin for
        return kwargs

    def _wrap(self):
        root = self.sdft if self.sdft is not None else self.student
        if self.kind.startswith("fsdp2"):
            kwargs = self._fsdp2_kwargs()
            if self.kind == "fsdp2_head_unit":
                from torch.distributed.fsdp import fully_shard

                fully_shard(self.student.get_output_embeddings(), **kwargs)
            fully_shard_layers(root, **kwargs)
            self.wrapper = root
            self.optimizer = optimizer(root.parameters())
        elif self.kind == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy
            from transformers.models.llama.modeling_llama import LlamaDecoderLayer

            self.wrapper = FullyShardedDataParallel(root, sharding_strategy=ShardingStrategy.FULL_SHARD,
                                                    auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                                    device_id=torch.device("cpu"), use_orig_params=True)
            self.optimizer = optimizer(self.wrapper.parameters())
        elif self.kind == "zero3":
            import deepspeed

            client = optimizer([p for p in root.parameters() if p.requires_grad])
            self.wrapper, self.optimizer, *_ = deepspeed.initialize(model=root, optimizer=client,
                                                                   config=zero3_config(self.settings))
        else:
            raise ValueError(f"unknown wrapper {self.kind!r}")

    # -- one step ---------------------------------------------------------------------------
    def micro_loss(self, batch, num_items):
        if self.sdft is not None:
            return self.wrapper(num_items_in_batch=num_items, **batch).loss
        inner = self.wrapper.module if self.kind in ("fsdp1", "zero3") else self.student
        return causal_lm_loss(inner, batch, self.teacher, self.loss, num_items, wrapper=self.wrapper).loss

    def step(self, step: int, die_after_forward: bool = False) -> float:
        batches = [micro_batch(self.rows, step, m, self.rank, self.world) for m in range(MICRO_BATCHES)]
        # The normaliser: the step's targets over every process, as the Trainer counts them.
        num_items = sum(count_loss_targets(b) for b in batches)
        dist.all_reduce(num_items)
        total = 0.0
        for m, batch in enumerate(batches):
            last = m == MICRO_BATCHES - 1
            self._sync(last)
            # The wrappers average gradients over processes; the loss is a sum over all of
            # them / num_items, so each process's part is scaled by the world size.
            loss = self.micro_loss(batch, num_items)
            if die_after_forward:
                os.kill(os.getpid(), signal.SIGKILL)
            total += float(loss.detach())
            self._backward(loss * self.world, last)
        summed = torch.tensor(total, dtype=torch.float64)
        dist.all_reduce(summed)
        return float(summed)

    def _sync(self, last: bool):
        if self.kind.startswith("fsdp2"):
            self.wrapper.set_requires_gradient_sync(last)
        elif self.kind == "fsdp1":
            if not last:
                self._no_sync = self.wrapper.no_sync()
                self._no_sync.__enter__()
            elif getattr(self, "_no_sync", None) is not None:
                self._no_sync.__exit__(None, None, None)
                self._no_sync = None

    def _backward(self, loss, last: bool):
        if self.kind == "zero3":
            self.wrapper.backward(loss, scale_wrt_gas=False)
            if not last:  # the engine counts micro-batches in step(); the last one's is optimizer_step()
                self.wrapper.step()
        else:
            loss.backward()

    def optimizer_step(self):
        if self.kind == "zero3":
            self.wrapper.step()
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def whole_grads(self) -> dict:
        """Every gradient of the student, whole, by the student's parameter names (collective)."""
        names = {id(p): n.replace("_fsdp_wrapped_module.", "") for n, p in self.student.named_parameters()}
        grads = {}
        if self.kind == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(self.wrapper, with_grads=True):
                for p in self.student.parameters():
                    if p.grad is not None:
                        grads[names[id(p)]] = p.grad.detach().clone()
            return grads
        for name, p in self.student.named_parameters():
            if self.kind == "zero3":
                from deepspeed.utils import safe_get_full_grad

                grad = safe_get_full_grad(p) if p.requires_grad else None
            else:
                grad = p.grad
                grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
            if grad is not None:
                grads[name] = grad.detach().clone()
        return grads

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, path: Path):
        if self.kind == "zero3":
            self.wrapper.save_checkpoint(str(path))
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.wrapper, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))

    def load_checkpoint(self, path: Path):
        if self.kind == "zero3":
            self.wrapper.load_checkpoint(str(path))
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.wrapper, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.wrapper, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def save_weights(self):
        state = full_state_dict(self.student, self.wrapper)  # the student's, gathered on rank 0
        if self.rank == 0:
            torch.save(state, self.out / "weights.pt")


def main(settings: dict, out: Path) -> None:
    if any(case["wrapper"] == "zero3" for case in settings["cases"].values()):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    phase = settings["phase"]
    runs = {}
    for name, case in settings["cases"].items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        run = runs[name] = Run(case, folder)
        checkpoint = folder / "checkpoint"
        if phase == "kill":
            losses = {0: run.step(0)}
            grads = run.whole_grads()
            run.optimizer_step()
            run.save_checkpoint(checkpoint)
            if run.rank == 0:
                torch.save(grads, folder / "step1-grads.pt")
                (folder / "result-kill.json").write_text(json.dumps({"losses": losses}))
        else:
            run.load_checkpoint(checkpoint)
            losses = {1: run.step(1)}
            run.optimizer_step()
            run.save_weights()
            if run.rank == 0:
                (folder / "result-resume.json").write_text(json.dumps({"losses": losses}))
        dist.barrier()
    if phase == "kill":  # both processes die in the middle of a step
        run.step(1, die_after_forward=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), Path(sys.argv[2]))
