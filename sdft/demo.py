"""``sdft demo``: the paper's effect on an embedded toy world, on a CPU, in minutes.

1. Generate a world of name-keyed entities and pretrain a tiny Llama on its old facts (cached).
2. Classify what the model knows (SliCK-style): train-known and held-out-known keep only Known
   facts, train-unknown only Unknown ones.
3. Stage 1 (task format): one epoch of plain SFT on the train-known facts.
4. Stage 2, from the stage-1 model, on train-known + train-unknown facts, three ways:
   ``sft`` (cross-entropy), ``sdft`` (+ lambda tau^2 KL to the stage-1 snapshot, lambda 1,
   tau 0.5), ``ffn_frozen`` (cross-entropy with every MLP block frozen).
   Held-out-known accuracy is measured during training: its drop is the forgetting.
5. Repeat over seeds; print a table shaped like the paper's Table 1; write results JSON and a
   plot (held-out and new-fact accuracy against step) to the output folder.

    sdft demo                 # 3 seeds, under 15 minutes on 2 cores
    sdft demo --quick         # 1 seed, a smaller world, under 3 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

METHODS = ("sft", "sdft", "ffn_frozen")
METHOD_LABELS = {"sft": "SFT", "sdft": "SDFT (lambda 1, tau 0.5)", "ffn_frozen": "SFT, FFN frozen"}


@dataclass
class DemoConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    world_seed: int = 0
    n_old: int = 1000
    n_new: int = 300
    n_relations: int = 3
    classify_samples: int = 4  # SliCK: sampled answers per greedy-wrong question
    stage1_epochs: float = 1.0
    stage2_epochs: float = 8.0
    # 3e-4: at 1e-3 every method forgets half the held-out facts within a few epochs, which
    # hides the differences; at 2e-4 SFT forgets less than the paper's ~15 points.
    learning_rate: float = 3e-4
    batch_size: int = 32
    eval_every: int = 25  # optimizer steps between evaluations
    kl_weight: float = 1.0
    temperature: float = 0.5
    methods: tuple[str, ...] = METHODS
    pretrain_steps: int = 6000  # cap; pretraining stops once every old fact is answered
    pretrain_eval_every: int = 500
    workers: int = 2  # processes side by side, one thread each
    out_dir: str = "runs/demo"
    cache_dir: str = ".cache/sdft-demo"
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides) -> "DemoConfig":
        # 240 old entities pretrain in ~25 s on 2 cores (1000 take ~2 minutes).
        base = cls(seeds=(0,), n_old=240, n_new=80, stage2_epochs=8.0, eval_every=10, pretrain_steps=3000,
                   pretrain_eval_every=250, quick=True)
        return replace(base, **overrides)


# ---------------------------------------------------------------------------------------------
# One stage-2 run (a worker process)


def _train(model, rows, tokenizer, cfg: DemoConfig, seed: int, epochs: float, *, teacher=None,
           loss=None, freeze_spec=None, evaluator=None, log_every: int = 0):
    """Fine-tune ``model`` in place with :class:`sdft.SDFTTrainer`; returns the eval history."""
    from datasets import Dataset
    from transformers import TrainerCallback, TrainingArguments

    from .data import PadCollator
    from .freezing import freeze, masked_optimizer, param_groups
    from .loss import SDFTLoss
    from .toyworld import encode_example
    from .trainer import SDFTTrainer

    examples = []
    for r in rows:
        ids, labels = encode_example(tokenizer, r["question"], r["answer"])
        examples.append({"input_ids": ids, "labels": labels})
    optimizer = None
    if freeze_spec is not None:
        report = freeze(model, freeze_spec)
        optimizer = masked_optimizer(torch.optim.AdamW(param_groups(model), lr=cfg.learning_rate), report)
    history: list[dict] = []

    class Evaluate(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            history.append(evaluator(model, 0))

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % cfg.eval_every == 0 or state.global_step == state.max_steps:
                history.append(evaluator(model, state.global_step))

    args = TrainingArguments(
        output_dir=os.path.join(cfg.cache_dir, "trainer-scratch"), per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=epochs, learning_rate=cfg.learning_rate, lr_scheduler_type="constant",
        weight_decay=0.0, seed=seed, data_seed=seed, save_strategy="no", report_to=[], disable_tqdm=True,
        logging_strategy="no", use_cpu=True, remove_unused_columns=False, dataloader_num_workers=0,
    )
    trainer = SDFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                          data_collator=PadCollator(tokenizer.pad_token_id), teacher=teacher,
                          sdft_loss=loss or SDFTLoss(), optimizers=(optimizer, None),
                          callbacks=[Evaluate()] if evaluator is not None else None)
    trainer.train()
    model.requires_grad_(True)  # undo a freeze: the caller may reuse the module
    return history


class _TeacherForcedEval:
    """Exact match of the three splits by one teacher-forced pass (equal to greedy decoding for
    one-token answers + eos, see ``toyworld.teacher_forced_exact_match``), with counts."""

    def __init__(self, tokenizer, splits: dict[str, list[dict]]):
        from .toyworld import encode_rows

        self.batches = {name: encode_rows(tokenizer, rows) for name, rows in splits.items()}

    def __call__(self, model, step: int) -> dict:
        from .evaluate import SPLIT_LABELS
        from .toyworld import teacher_forced_exact_match

        record = {"step": step}
        for name, batch in self.batches.items():
            ok = teacher_forced_exact_match(model, batch)
            label = SPLIT_LABELS.get(name, name)
            n, correct = int(ok.numel()), int(ok.sum())
            record.update({label: correct / n if n else float("nan"), f"{label}_correct": correct, f"{label}_n": n})
        return record


def run_one(job: tuple[DemoConfig, int, str, str]) -> dict:
    """Stage 1 then stage 2 with ``method`` for one seed, in a fresh single-threaded process."""
    cfg, seed, method, base_dir = job
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .loss import SDFTLoss
    from .teacher import FrozenCopy

    start = time.perf_counter()
    splits = json.loads((Path(base_dir) / "splits.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    evaluator = _TeacherForcedEval(tokenizer, splits)

    torch.manual_seed(seed)
    _train(model, splits["train_known"], tokenizer, cfg, seed, cfg.stage1_epochs,
           loss=SDFTLoss(kl_weight=0.0))
    after_stage1 = evaluator(model, 0)
    stage2_rows = splits["train_known"] + splits["train_unknown"]
    teacher = loss = freeze_spec = None
    if method == "sdft":
        teacher = FrozenCopy(model)
        loss = SDFTLoss(kl_weight=cfg.kl_weight, temperature=cfg.temperature)
    elif method == "ffn_frozen":
        freeze_spec = "ffn"
    history = _train(model, stage2_rows, tokenizer, cfg, seed, cfg.stage2_epochs, teacher=teacher, loss=loss,
                     freeze_spec=freeze_spec, evaluator=evaluator)
    return {"seed": seed, "method": method, "after_stage1": after_stage1, "history": history,
            "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------
# Preparation (main process): world, pretraining, knowledge classification


def prepare(cfg: DemoConfig, log=print) -> tuple[str, dict]:
    """Pretrained model + tokenizer + classified splits in a folder; returns it and the counts."""
    from .evaluate import classify_knowledge
    from .toyworld import PretrainOptions, ToyWorld, build_tokenizer, format_prompt, pretrain

    world = ToyWorld.generate(seed=cfg.world_seed, n_old=cfg.n_old, n_new=cfg.n_new, n_relations=cfg.n_relations)
    tokenizer = build_tokenizer(world)
    t0 = time.perf_counter()
    options = PretrainOptions(max_steps=cfg.pretrain_steps, eval_every=cfg.pretrain_eval_every)
    model = pretrain(world, tokenizer, cache_dir=cfg.cache_dir, seed=cfg.world_seed, options=options,
                     log=lambda r: log(f"  pretrain {r}") if r.get("done") else None)
    log(f"pretrained model ready in {time.perf_counter() - t0:.0f} s")

    splits = world.splits()
    counts = {}
    keep = {"train_known": "known", "heldout_known": "known", "train_unknown": "unknown"}
    classified = {}
    for name, rows in splits.items():
        split, c = classify_knowledge(model, tokenizer, rows, k=cfg.classify_samples, temperature=1.0,
                                      seed=cfg.world_seed, prompt_format=format_prompt, batch_size=512,
                                      max_new_tokens=2)
        classified[name] = split[keep[name]]
        counts[name] = c
    log("knowledge classes (SliCK): " + "; ".join(
        f"{name}: {c['known']} known / {c['maybe']} maybe / {c['unknown']} unknown of {c['total']}"
        for name, c in counts.items()))
    base_dir = Path(cfg.cache_dir) / f"base-{world.fingerprint()[:12]}"
    base_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    (base_dir / "splits.json").write_text(json.dumps(classified))
    return str(base_dir), counts


# ---------------------------------------------------------------------------------------------
# Summary: table, JSON, plot


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarise(runs: list[dict]) -> dict:
    """Per method: final task / new-fact / old-fact accuracy and forgetting, mean and std over seeds."""
    from .evaluate import forgetting

    table = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rows = [r for r in runs if r["method"] == method]
        per_seed = []
        for r in rows:
            final = r["history"][-1]
            drop = forgetting([h["old_facts"] for h in r["history"]])
            per_seed.append({"task": final["task"], "new_facts": final["new_facts"], "old_facts": final["old_facts"],
                             "forgetting_from_start": drop["drop_from_start"],
                             "forgetting_from_peak": drop["drop_from_peak"]})
        table[method] = {k: _mean_std([s[k] for s in per_seed]) for k in per_seed[0]}
        table[method]["seeds"] = [r["seed"] for r in rows]
    return table


def format_table(table: dict) -> str:
    cols = ("task", "new_facts", "old_facts", "forgetting_from_start", "forgetting_from_peak")
    heads = ("task (known)", "new facts", "held-out old facts", "forgetting (from start)", "forgetting (from peak)")
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(cols)]
    for method, stats in table.items():
        cells = [f"{100 * stats[c][0]:.1f} ± {100 * stats[c][1]:.1f}" for c in cols]
        lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for method in dict.fromkeys(r["method"] for r in runs):
        rows = [r for r in runs if r["method"] == method]
        steps = [h["step"] for h in rows[0]["history"]]
        for ax, key in zip(axes, ("old_facts", "new_facts")):
            series = [[h[key] for h in r["history"]] for r in rows]
            width = min(len(s) for s in series)
            mean = [sum(s[i] for s in series) / len(series) for i in range(width)]
            lo = [min(s[i] for s in series) for i in range(width)]
            hi = [max(s[i] for s in series) for i in range(width)]
            line, = ax.plot(steps[:width], [100 * m for m in mean], label=METHOD_LABELS.get(method, method))
            ax.fill_between(steps[:width], [100 * v for v in lo], [100 * v for v in hi], alpha=0.2,
                            color=line.get_color())
    axes[0].set_title("held-out old facts (forgetting)")
    axes[1].set_title("new facts (learning)")
    for ax in axes:
        ax.set_xlabel("stage-2 optimizer step")
        ax.set_ylabel("exact match (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Entry point


def run_demo(cfg: DemoConfig, log=print) -> dict:
    start = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    base_dir, counts = prepare(cfg, log)
    jobs = [(cfg, seed, method, base_dir) for seed in cfg.seeds for method in cfg.methods]
    log(f"stage 1 + stage 2: {len(jobs)} runs ({len(cfg.seeds)} seeds x {len(cfg.methods)} methods), "
        f"{cfg.workers} at a time")
    if cfg.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(cfg.workers) as pool:
            runs = []
            for r in pool.imap_unordered(run_one, jobs):
                log(f"  seed {r['seed']} {r['method']}: {r['seconds']:.0f} s, final {r['history'][-1]}")
                runs.append(r)
    else:
        runs = []
        for job in jobs:
            r = run_one(job)
            log(f"  seed {r['seed']} {r['method']}: {r['seconds']:.0f} s")
            runs.append(r)
    runs.sort(key=lambda r: (cfg.methods.index(r["method"]), r["seed"]))
    table = summarise(runs)
    text = format_table(table)
    results = {"config": asdict(cfg), "knowledge_counts": counts, "table": table, "runs": runs,
               "seconds": time.perf_counter() - start}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(text + "\n")
    plot(runs, out / "accuracy_vs_step.png")
    log("\n" + text)
    log(f"\nresults: {out / 'results.json'}, plot: {out / 'accuracy_vs_step.png'} "
        f"({results['seconds']:.0f} s in all)")
    return results


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="sdft demo", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, a smaller world (CI)")
    ap.add_argument("--out", default=None, help="output folder (default runs/demo or runs/demo-quick)")
    ap.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds")
    ap.add_argument("--workers", type=int, help="processes side by side")
    ap.add_argument("--cache-dir", help="where the pretrained toy model is cached")
    args = ap.parse_args(argv)
    overrides = {}
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    if args.workers:
        overrides["workers"] = args.workers
    if args.cache_dir:
        overrides["cache_dir"] = args.cache_dir
    overrides["out_dir"] = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    cfg = DemoConfig.quick_config(**overrides) if args.quick else replace(DemoConfig(), **overrides)
    run_demo(cfg)
    return 0
