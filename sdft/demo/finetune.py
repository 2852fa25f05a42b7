"""One fine-tuning run of the demo: stage 1 (task format), then stage 2 with one method.

This is the paper's recipe written against the library's public API, as a user would write it:
the Trainer that ``sdft train`` uses (:func:`sdft.trainer.build_trainer`) with an
``sdft.SDFTLoss``, a ``sdft.teacher.FrozenCopy`` of the stage-1 model as the teacher, and
``sdft.freezing`` for the freezing rows. :func:`run_one` runs in a worker process of the
experiment (see :mod:`sdft.demo.experiment`)::

    record = run_one(RunSpec(seed=0, method=Method("sft", "SFT"), base_dir=...,
                             learning_rate=1e-4, stage2_epochs=16))
    record["history"]     # accuracy records by epoch, the first before stage 2 starts
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from sdft import SDFTLoss
from sdft.data import PadCollator
from sdft.freezing import FreezeReport, freeze
from sdft.teacher import FrozenCopy
from sdft.trainer import build_trainer

from .methods import Method
from .scoring import SplitAccuracy
from .tokenizer import encode_example


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs; picklable, so it travels to a worker process."""

    seed: int
    method: Method
    base_dir: str                 # the pretrained model, its tokenizer and splits.json
    learning_rate: float = 1e-4
    batch_size: int = 32
    stage1_epochs: float = 1.0
    stage2_epochs: float = 16.0
    temperature: float = 0.5      # tau of the SDFT rows
    eval_every_epochs: int = 1    # stage-2 evaluations: before it, every this many epochs, at its end
    scratch_dir: str = ".cache/sdft-demo/trainer-scratch"  # the Trainer's output_dir; nothing is saved


def stage_trainer(model, examples: list[dict], tokenizer, spec: RunSpec, epochs: float, *,
                  teacher=None, loss: Optional[SDFTLoss] = None,
                  freeze_report: Optional[FreezeReport] = None, callbacks=()):
    """The Hugging Face trainer of one stage, built as ``sdft train`` builds its own
    (:func:`sdft.trainer.build_trainer`): constant learning rate, no weight decay, no saving.

    The Trainer's console printer is removed: the experiment shows one progress display, and
    each run's accuracies go to its log through the returned history.
    """
    from datasets import Dataset
    from transformers import PrinterCallback, TrainingArguments

    args = TrainingArguments(
        output_dir=spec.scratch_dir, per_device_train_batch_size=spec.batch_size,
        num_train_epochs=epochs, learning_rate=spec.learning_rate, lr_scheduler_type="constant",
        weight_decay=0.0, seed=spec.seed, data_seed=spec.seed, save_strategy="no", report_to=[],
        disable_tqdm=True, logging_strategy="no", use_cpu=True, remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = build_trainer(model, args, Dataset.from_list(examples), PadCollator(tokenizer.pad_token_id),
                            teacher=teacher, loss=loss or SDFTLoss(kl_weight=0.0), freeze_report=freeze_report,
                            callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    return trainer


def _evaluate_by_epoch(score: SplitAccuracy, model, history: list[dict], every: int):
    """A callback that appends the accuracies before training, after every ``every``-th epoch
    and after the last one."""
    from transformers import TrainerCallback

    class EvaluateByEpoch(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            history.append({"epoch": 0.0, "step": 0, **score(model)})

        def on_epoch_end(self, args, state, control, **kw):
            epoch = round(float(state.epoch), 3)
            if round(epoch) % every == 0 or state.global_step >= state.max_steps:
                history.append({"epoch": epoch, "step": state.global_step, **score(model)})

    return EvaluateByEpoch()


def _examples(tokenizer, rows: list[dict], encode: Callable = encode_example) -> list[dict]:
    return [dict(zip(("input_ids", "labels"), encode(tokenizer, r["question"], r["answer"]))) for r in rows]


def trainable_names(model) -> list[str]:
    """Names of the parameters that train (``requires_grad``), in model order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def stage2(model, tokenizer, splits: dict[str, list[dict]], spec: RunSpec, score: Optional[Callable] = None,
           encode: Callable = encode_example):
    """Fine-tune the stage-1 ``model`` in place with ``spec.method``; returns the accuracy history
    (see :class:`RunSpec`'s ``eval_every_epochs``; empty without ``score``) and the freeze report
    (``None`` for rows that freeze nothing).

    ``score(model)`` returns one accuracy record (:class:`SplitAccuracy` for the toy);
    ``encode(tokenizer, question, answer)`` gives an example's ``(input_ids, labels)`` (the
    toy's :func:`~sdft.demo.tokenizer.encode_example` by default).
    """
    method = spec.method
    rows = splits["train_known"] + (splits["train_unknown"] if method.data == "all" else [])
    teacher, loss = None, SDFTLoss(kl_weight=0.0)
    if method.kl_weight > 0:
        # The snapshot before stage 2 starts: the paper's teacher.
        teacher = FrozenCopy(model)
        loss = SDFTLoss(kl_weight=method.kl_weight, temperature=spec.temperature)
    report = freeze(model, method.freeze, train_only=method.train_only) if method.freezes else None
    history: list[dict] = []
    callbacks = [_evaluate_by_epoch(score, model, history, spec.eval_every_epochs)] if score is not None else []
    trainer = stage_trainer(model, _examples(tokenizer, rows, encode), tokenizer, spec, spec.stage2_epochs,
                            teacher=teacher, loss=loss, freeze_report=report, callbacks=callbacks)
    trainer.train()
    return history, report


def run_one(spec: RunSpec) -> dict:
    """Stage 1 then stage 2 for one seed and method, from the pretrained model in ``base_dir``.

    Returns ``{"seed", "method", "after_stage1", "history", "trained_parameters",
    "total_parameters", "seconds", "cpu_seconds", "spec"}``. ``history`` holds the accuracy
    records of stage 2, the first taken before it starts; ``cpu_seconds`` is this
    process's CPU time, which on a busy machine says more about the cost than the wall time.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start, cpu_start = time.perf_counter(), time.process_time()
    base = Path(spec.base_dir)
    splits = json.loads((base / "splits.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    score = SplitAccuracy(tokenizer, splits)

    # Stage 1, the same for every method of a seed: one epoch of plain SFT on the known facts.
    torch.manual_seed(spec.seed)
    stage_trainer(model, _examples(tokenizer, splits["train_known"]), tokenizer, spec, spec.stage1_epochs).train()
    after_stage1 = score(model)

    history, report = stage2(model, tokenizer, splits, spec, score)
    total = sum(p.numel() for p in model.parameters())
    trained = report.trainable if report is not None else total
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"seed {spec.seed} {spec.method.key}: {seconds:.0f} s ({cpu_seconds:.0f} s of CPU), "
          f"{trained:,} of {total:,} parameters trained; by epoch (task / new / old facts, %): " + ", ".join(
              f"{h['epoch']:g}: {100 * h['task']:.1f} / {100 * h['new_facts']:.1f} / {100 * h['old_facts']:.1f}"
              for h in history), flush=True)
    return {"seed": spec.seed, "method": spec.method.key, "after_stage1": after_stage1, "history": history,
            "trained_parameters": trained, "total_parameters": total, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "spec": {**asdict(spec), "method": spec.method.key}}
