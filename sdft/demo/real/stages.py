"""The study's jobs, each run in a worker process with one thread: classify one relation, stage 1
of one seed, stage 2 of one (seed, method).

Every job reads the models it needs from folders (the base model saved once as an ordinary Hugging
Face folder, each seed's stage-1 snapshot) and returns a plain record; nothing is shared between
processes. Stage 2 is the toy demo's (:func:`sdft.demo.finetune.stage2`: the Trainer of
``sdft train`` with ``SDFTLoss``, a ``FrozenCopy`` teacher of the stage-1 snapshot, and
``sdft.freezing`` for the freezing rows) with this study's prompt format and scores.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sdft.demo.finetune import RunSpec, stage2, stage_trainer

from .knowledge import SplitScores, answer_scores, class_counts, knowledge_classes
from .model import load_plain, save_plain
from .prompts import encode_example, few_shot_format


@dataclass(frozen=True)
class Classify:
    """SliCK settings: ``k`` answers sampled at ``temperature`` for each greedy-wrong fact."""

    k: int = 16
    temperature: float = 0.5
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Classification of the base model's knowledge (few-shot)


@dataclass(frozen=True)
class ClassifyJob:
    relation: str
    rows: tuple[dict, ...]          # the relation's facts
    shots: tuple[dict, ...]         # its in-context examples
    model_dir: str                  # the base model (ordinary Hugging Face folder)
    classify: Classify


def classify_relation(job: ClassifyJob) -> dict:
    """``{"relation", "classes", "counts", "seconds", "cpu_seconds"}``: the base model's SliCK
    class of each fact, in row order, from few-shot prompts."""
    start, cpu_start = time.perf_counter(), time.process_time()
    model, tokenizer = load_plain(job.model_dir)
    c = job.classify
    scores = answer_scores(model, tokenizer, job.rows, prompt_format=few_shot_format(job.shots),
                           temperatures=(c.temperature,))
    classes = knowledge_classes(scores, k=c.k, temperature=c.temperature, seed=c.seed)
    counts = class_counts(classes)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"classified {job.relation}: {counts} in {seconds:.0f} s ({cpu_seconds:.0f} s of CPU)", flush=True)
    return {"relation": job.relation, "classes": classes, "counts": counts, "seconds": seconds,
            "cpu_seconds": cpu_seconds}


# ---------------------------------------------------------------------------------------------
# Stage 1: the task format, once per seed


@dataclass(frozen=True)
class Stage1Job:
    spec: RunSpec                   # spec.base_dir: the base model; spec.method is not used
    splits_path: str
    out_dir: str                    # where the stage-1 snapshot goes
    classify: Classify


def _scorer(tokenizer, splits: dict, classify: Classify) -> SplitScores:
    return SplitScores(tokenizer, splits, k=classify.k, temperature=classify.temperature, seed=classify.seed)


def run_stage1(job: Stage1Job) -> dict:
    """One epoch (``spec.stage1_epochs``) of SFT on the train-known facts from the base model; the
    snapshot and ``stage1.json`` (its scores) are written to ``out_dir``. Returns
    ``{"seed", "after_stage1", "seconds", "cpu_seconds"}``."""
    start, cpu_start = time.perf_counter(), time.process_time()
    spec = job.spec
    splits = json.loads(Path(job.splits_path).read_text())
    model, tokenizer = load_plain(spec.base_dir)
    torch.manual_seed(spec.seed)
    examples = [dict(zip(("input_ids", "labels"), encode_example(tokenizer, r["question"], r["answer"])))
                for r in splits["train_known"]]
    stage_trainer(model, examples, tokenizer, spec, spec.stage1_epochs).train()
    after = _letters(_scorer(tokenizer, splits, job.classify)(model, keep_classes=True))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    record = {"seed": spec.seed, "after_stage1": after, "seconds": seconds, "cpu_seconds": cpu_seconds}
    out = Path(job.out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".stage1-", dir=out.parent))
    save_plain(model, tokenizer, tmp)
    shutil.copy(job.splits_path, tmp / "splits.json")
    (tmp / "stage1.json").write_text(json.dumps(record))
    try:
        os.rename(tmp, out)
    except OSError:  # another study wrote it first: keep that copy
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"seed {spec.seed} stage 1: {seconds:.0f} s ({cpu_seconds:.0f} s of CPU); task / new / old facts "
          f"{_percent(after)}", flush=True)
    return record


# ---------------------------------------------------------------------------------------------
# Stage 2: one method from the stage-1 snapshot


@dataclass(frozen=True)
class Stage2Job:
    spec: RunSpec                   # spec.base_dir: the seed's stage-1 snapshot (with splits.json)
    classify: Classify


def run_stage2(job: Stage2Job) -> dict:
    """Stage 2 of one (seed, method) from the stage-1 snapshot, scored before it starts and every
    ``spec.eval_every_epochs``. Returns the toy demo's run record (``seed``, ``method``,
    ``after_stage1``, ``history``, ``trained_parameters``, ``total_parameters``, ``seconds``,
    ``cpu_seconds``, ``spec``); each history record holds every fact's class as a string, one
    letter per fact (``K``/``M``/``U``), in split order. The first record is the stage-1
    snapshot's, as stage 1 scored it."""
    start, cpu_start = time.perf_counter(), time.process_time()
    spec = job.spec
    base = Path(spec.base_dir)
    splits = json.loads((base / "splits.json").read_text())
    after_stage1 = json.loads((base / "stage1.json").read_text())["after_stage1"]
    model, tokenizer = load_plain(base)
    scorer = _scorer(tokenizer, splits, job.classify)
    pending = [after_stage1]

    def score(m) -> dict:
        # The first call comes before the first step: the model is the stage-1 snapshot, whose
        # record stage 1 computed already (the same weights, so the same record).
        if pending:
            return dict(pending.pop())
        return _letters(scorer(m, keep_classes=True))

    torch.manual_seed(spec.seed)
    history, report = stage2(model, tokenizer, splits, spec, score, encode=encode_example)
    total = sum(p.numel() for p in model.parameters())
    trained = report.trainable if report is not None else total
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"seed {spec.seed} {spec.method.key}: {seconds:.0f} s ({cpu_seconds:.0f} s of CPU), {trained:,} of "
          f"{total:,} parameters trained; by epoch (task / new / old facts, %): "
          + ", ".join(f"{h['epoch']:g}: {_percent(h)}" for h in history), flush=True)
    return {"seed": spec.seed, "method": spec.method.key, "after_stage1": after_stage1, "history": history,
            "trained_parameters": trained, "total_parameters": total, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "spec": {**asdict(spec), "method": spec.method.key}}


def _letters(record: dict) -> dict:
    """The record with each split's class list as a string, one letter per fact (K, M, U)."""
    record["classes"] = {label: "".join(c[0].upper() for c in classes) for label, classes in record["classes"].items()}
    return record


def _percent(record: dict) -> str:
    return " / ".join(f"{100 * record[k]:.1f}" for k in ("task", "new_facts", "old_facts"))
