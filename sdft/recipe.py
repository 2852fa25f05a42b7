"""The recipe behind ``sdft train``: data, model, the paper's two stages, checkpoints, results.

(:mod:`sdft.trainer` holds the Trainer subclass this recipe runs.)

One process::

    sdft train config.yaml --loss.kl_weight 0.5 --output_dir runs/x
    python -m sdft train config.yaml

Several GPUs::

    torchrun --nproc_per_node 4 -m sdft train config.yaml                          # DDP
    torchrun --nproc_per_node 4 -m sdft train config.yaml --fsdp true              # FSDP2
    torchrun --nproc_per_node 4 -m sdft train config.yaml --deepspeed zero3.json   # ZeRO-3
    accelerate launch --config_file fsdp.yaml -m sdft train config.yaml           # accelerate's config

Under FSDP (FSDP2 or FSDP1, any sharding strategy) and DeepSpeed (ZeRO-2 or ZeRO-3) the loss
runs inside the wrapper's forward, where the LM head is whole (:mod:`sdft.sharding`); a
``frozen_copy`` teacher is sharded as the student. Partial freezing masks are refused there
(whole-tensor freezing works). The results (``stage1/final``, ``final``) are whole models,
gathered from every process and written by the first.

With ``stage1_epochs > 0`` this runs the paper's recipe: stage 1 trains on the known rows with
plain cross-entropy; the teacher is then snapshotted from the stage-1 model; stage 2 trains on
all rows with the SDFT loss, continuing from stage 1. ``--resume`` continues from the last
complete checkpoint of the stage that was running; results (``stage1/final``, ``final``) are
renamed into place once written, so a stopped run never leaves one that looks finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

from .config import TrainConfig, to_dict
from .data import DataError, DataReport, PadCollator, heldout_qa_rows, load_rows, tokenize_rows
from .evaluate import ForgettingEval
from .freezing import freeze
from .loss import SDFTLoss
from .sharding import full_state_dict
from .teacher import AdapterDisabled, FrozenCopy, HiddenStateCache
from .trainer import SDFTTrainer, build_trainer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MetricsJsonl(TrainerCallback):
    """Appends every log line (step, loss, ce, kl, lr, grad norm, tokens/s, peak memory) to a file."""

    def __init__(self, path: Path, stage: str):
        self.path, self.stage = path, stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"stage": self.stage, "step": state.global_step, **logs}
        if torch.cuda.is_available():
            record["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            import resource

            record["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class _TokensPerSecond(TrainerCallback):
    """Adds ``tokens_per_s`` to each log line; runs before the callbacks that write the line."""

    def __init__(self):
        self.trainer: Optional[SDFTTrainer] = None  # set once the trainer exists
        self.last = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        now, seen = time.perf_counter(), self.trainer.tokens_seen
        if self.last is not None and logs is not None and now > self.last[0]:
            logs["tokens_per_s"] = round((seen - self.last[1]) / (now - self.last[0]), 1)
        self.last = (now, seen)


class HeldOutForgetting(TrainerCallback):
    """Scores the student on the held-out known rows (``eval.heldout_file``) at the start of a
    stage, every ``eval.steps`` optimizer steps and at its end, and appends ``old_facts`` (greedy
    exact-match accuracy, with its ``_correct`` / ``_n`` counts) and ``forgetting`` (its drop since
    the stage began; positive = forgotten) to the metrics file. The first process scores; the
    others go on (a DDP student is whole on each process)."""

    def __init__(self, evaluator: ForgettingEval, student, path: Path, stage: str, every: int):
        self.evaluator, self.student, self.path, self.stage, self.every = evaluator, student, path, stage, every
        self.scored_step: Optional[int] = None

    def _score(self, state) -> None:
        if not state.is_world_process_zero or self.scored_step == state.global_step:
            return
        self.scored_step = state.global_step
        scores = self.evaluator(self.student, step=state.global_step)
        record = {"stage": self.stage, "step": state.global_step,
                  **{k: v for k, v in scores.items() if k.startswith("old_facts")},
                  "forgetting": self.evaluator.forgetting("old_facts")["drop_from_start"]}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self._score(state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self._score(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._score(state)


def training_arguments(cfg: TrainConfig, output_dir: Path, epochs: float) -> TrainingArguments:
    """The ``TrainingArguments`` of one stage. Every field of :class:`TrainConfig` that is a
    training argument is passed here, and the optimizer is built from these arguments
    (:func:`sdft.trainer.build_trainer`), so a setting cannot stop short of the optimizer."""
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_schedule,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=cfg.weight_decay,
        num_train_epochs=epochs, max_steps=cfg.max_steps, logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, seed=cfg.seed, data_seed=cfg.seed,
        report_to=[], remove_unused_columns=False,  # the collator builds exactly the batch we need
        train_sampling_strategy=cfg.sampling,
        use_cpu=not torch.cuda.is_available(), bf16=cfg.dtype == "bfloat16" and torch.cuda.is_available(),
        save_only_model=False, logging_first_step=True, disable_tqdm=False,
        fsdp=cfg.fsdp or None, fsdp_config=cfg.fsdp_config, deepspeed=cfg.deepspeed,  # README, "Scale out"
    )
    return args


def _run_stage(cfg, name, student, teacher, loss, examples, tokenizer, metrics_path, resume, epochs, freeze_report,
               heldout=None):
    """Train ``student`` in place on ``examples``; returns the trainer. ``heldout``: the
    question / answer rows of ``eval.heldout_file``, scored during the stage."""
    from datasets import Dataset

    out = Path(cfg.output_dir) / name
    tokens_per_s = _TokensPerSecond()
    callbacks = [tokens_per_s, MetricsJsonl(metrics_path, name)]
    if heldout:
        evaluator = ForgettingEval(tokenizer, {"heldout_known": heldout}, max_rows=cfg.eval.max_rows, seed=cfg.seed,
                                   batch_size=cfg.batch_size, max_new_tokens=cfg.eval.max_new_tokens)
        callbacks.append(HeldOutForgetting(evaluator, student, metrics_path, name, cfg.eval.steps))
    trainer = build_trainer(student, training_arguments(cfg, out, epochs), Dataset.from_list(examples),
                            PadCollator(tokenizer.pad_token_id, cfg.loss.ignore_index), teacher=teacher, loss=loss,
                            freeze_report=freeze_report, callbacks=callbacks, check_head=cfg.check_head)
    tokens_per_s.trainer = trainer
    checkpoint = newest_complete_checkpoint(out) if resume else None
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer


def _sharded(trainer: SDFTTrainer) -> bool:
    return bool(trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)


def save_result(trainer: SDFTTrainer, student, tokenizer, folder: Path) -> None:
    """:func:`save_final` of the trained student, whole: gathered from every process under
    FSDP or ZeRO-3 (every process calls this) and written by the first; the others wait for
    it."""
    state = full_state_dict(student, trainer.model_wrapped) if _sharded(trainer) else None
    if trainer.args.process_index == 0:
        save_final(student, tokenizer, folder, state)
    trainer.accelerator.wait_for_everyone()


def newest_complete_checkpoint(folder: Path) -> Optional[str]:
    """The newest ``checkpoint-N`` in ``folder`` whose save finished, or None.

    The Trainer writes ``trainer_state.json`` last, after the weights, optimizer and RNG state:
    a checkpoint whose state file is missing, unreadable or names another step was being saved
    when the run stopped. Such checkpoints hold nothing usable; they are removed (with a
    message), and training resumes from the newest complete one.
    """
    steps = []
    for path in Path(folder).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            steps.append((int(match.group(1)), path))
    for step, path in sorted(steps, reverse=True):
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            state = None
        if isinstance(state, dict) and state.get("global_step") == step:
            return str(path)
        print(f"resume: {path} was not saved completely; removing it")
        shutil.rmtree(path, ignore_errors=True)
    return None


def save_final(model, tokenizer, folder: Path, state_dict: Optional[dict] = None) -> None:
    """Write ``folder`` (model and tokenizer) so that it exists only once complete;
    ``state_dict``: the model's weights when ``model`` itself holds shards of them.

    Everything goes to ``<folder>.partial`` first and is renamed into place: a run stopped
    during the save leaves no folder that looks finished but does not load.
    """
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, state_dict=state_dict)
    tokenizer.save_pretrained(partial)
    if folder.exists():  # a rerun into the same output_dir replaces the old result
        shutil.rmtree(folder)
    os.replace(partial, folder)


def load_tokenizer(cfg: TrainConfig, path=None):
    tokenizer = AutoTokenizer.from_pretrained(path or cfg.tokenizer or cfg.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_student(cfg: TrainConfig, path=None):
    """The model to train, from ``path`` (a stage-1 result) or ``cfg.model``, with every model
    option of the config applied (dtype, gradient checkpointing): one place for both loads."""
    model = AutoModelForCausalLM.from_pretrained(path or cfg.model, dtype=_DTYPES[cfg.dtype])
    if cfg.gradient_checkpointing:
        # transformers 5.25 renamed it (the old name warns); older releases have only the old one.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model


def add_lora(model, cfg: TrainConfig):
    """Wrap ``model`` with LoRA adapters (peft) as configured; the base weights freeze."""
    try:
        import peft
    except ImportError as err:  # pragma: no cover - peft is an optional extra
        raise ImportError("lora.r > 0 needs peft: pip install 'sdft-kernels[peft]'") from err
    lora = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                           target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora)


def _make_teacher(cfg: TrainConfig, student, examples, tokenizer):
    source = cfg.teacher.source
    if source == "none":
        return None
    if source == "frozen_copy":
        return FrozenCopy(student, dtype=_DTYPES[cfg.teacher.dtype] if cfg.teacher.dtype else None)
    if source == "adapter_disabled":
        return AdapterDisabled(student)
    cache_dir = Path(cfg.teacher.cache_dir or Path(cfg.output_dir) / "teacher_cache")
    if not (cache_dir / "meta.json").exists() and int(os.environ.get("RANK", "0")) == 0:
        HiddenStateCache.build(student, examples, cache_dir, dtype=_DTYPES[cfg.teacher.cache_dtype],
                               pad_token_id=tokenizer.pad_token_id, batch_size=cfg.batch_size)
    if torch.distributed.is_initialized():  # the other processes wait for the first's cache
        torch.distributed.barrier()
    cache = HiddenStateCache(cache_dir)
    cache.check_matches(examples, student)  # another dataset or teacher: refused, never reused
    return cache


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run the configured training; returns the folder of the final model.

    The data is read and checked before the model loads, so a bad file fails in seconds.
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    tokenizer = load_tokenizer(cfg)
    examples, data_report = tokenize_rows(load_rows(cfg.data), tokenizer, cfg.data, cfg.loss.ignore_index)
    _write_data_report(out, data_report)
    heldout = heldout_qa_rows(Path(cfg.eval.heldout_file), cfg.data) if cfg.eval.heldout_file else None
    if cfg.stage1_epochs > 0 and not any(ex["known"] for ex in examples):
        raise DataError(f"stage 1 needs known rows, but no row has {cfg.data.known_field}=true")
    torch.manual_seed(cfg.seed)
    student = load_student(cfg)
    if cfg.lora.r > 0:  # before freezing: freeze specs then apply to the adapted model
        student = add_lora(student, cfg)
    freeze_report = _freeze(cfg, student)
    metrics = out / "metrics.jsonl"
    loss = SDFTLoss.from_config(cfg.loss)

    if cfg.stage1_epochs > 0:
        stage1_final = out / "stage1" / "final"
        if stage1_final.is_dir():  # complete: it is renamed into place only once written
            if cfg.lora.r > 0:
                raise ValueError(f"{stage1_final} holds LoRA adapters only; resuming a LoRA two-stage run "
                                 "after stage 1 is not supported: remove it to rerun stage 1")
            student = load_student(cfg, stage1_final)
            freeze_report = _freeze(cfg, student)
        else:
            known = [ex for ex in examples if ex["known"]]
            stage1 = _run_stage(cfg, "stage1", student, None, loss, known, tokenizer, metrics,  # no teacher: CE
                                resume, cfg.stage1_epochs, freeze_report, heldout)
            save_result(stage1, student, tokenizer, stage1_final)
            if _sharded(stage1):  # the wrapper sharded the student in place: stage 2 starts from the saved result
                if cfg.lora.r > 0:
                    raise ValueError("a LoRA two-stage run under FSDP or DeepSpeed is not supported: stage 1 saved "
                                     "the adapters only, and the sharded student cannot be snapshotted in place")
                student = load_student(cfg, stage1_final)
                freeze_report = _freeze(cfg, student)

    teacher = _make_teacher(cfg, student, examples, tokenizer)
    trainer = _run_stage(cfg, "stage2" if cfg.stage1_epochs > 0 else "train", student, teacher, loss, examples,
                         tokenizer, metrics, resume, cfg.epochs, freeze_report, heldout)
    final = out / "final"
    save_result(trainer, student, tokenizer, final)
    return final


def _freeze(cfg: TrainConfig, student):
    if not (cfg.freeze or cfg.train_only):
        return None
    report = freeze(student, cfg.freeze or None, train_only=cfg.train_only)
    print(report)
    return report


def _write_data_report(out: Path, report: DataReport) -> None:
    print(f"data: {report}")
    (out / "data_report.json").write_text(json.dumps(
        {k: getattr(report, k) for k in ("rows", "kept", "malformed", "missing_fields", "empty_response",
                                         "prompt_too_long", "truncated")} | {"examples": report.examples[:20]}, indent=1))
