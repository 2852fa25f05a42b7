"""The demo's results: the table over seeds, the lambda trade-off (frontier), and two plots.

Metrics per run, from the last evaluation of stage 2 (exact match, fractions):
``task`` (train-known facts), ``new_facts`` (train-unknown), ``old_facts`` (held-out known), and
``forgetting`` = the drop of held-out accuracy from its peak during stage 2 (the paper's figure;
the peak includes the accuracy before stage 2 starts). The table gives mean and sample standard
deviation over seeds.

The frontier answers "which lambda should I pick": among the SDFT rows that learn at least
:data:`LEARN_FRACTION` of the new facts SFT learns (mean final accuracy, same seeds), the one
that forgets least, and whether it forgets at most :data:`FORGET_FRACTION` of what SFT forgets
(the paper: about a fifth).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from sdft.evaluate import forgetting

from .methods import Method

LEARN_FRACTION = 0.9
FORGET_FRACTION = 1 / 3
METRICS = ("task", "new_facts", "old_facts", "forgetting", "forgetting_from_start")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def run_metrics(run: dict) -> dict:
    """The final metrics of one run (see the module docstring)."""
    final = run["history"][-1]
    drop = forgetting([h["old_facts"] for h in run["history"]])
    return {"task": final["task"], "new_facts": final["new_facts"], "old_facts": final["old_facts"],
            "forgetting": drop["drop_from_peak"], "forgetting_from_start": drop["drop_from_start"]}


def summarise(runs: list[dict], methods: Sequence[Method] = ()) -> dict:
    """Per method key, in first-seen order: ``[mean, std]`` of each metric over seeds, plus
    ``seeds``, ``label``, and ``trained_parameters`` / ``total_parameters`` when the runs have them."""
    labels = {m.key: m.label for m in methods}
    table = {}
    for key in dict.fromkeys(r["method"] for r in runs):
        rows = [r for r in runs if r["method"] == key]
        per_seed = [run_metrics(r) for r in rows]
        entry = {m: list(mean_std([s[m] for s in per_seed])) for m in METRICS}
        entry.update(label=labels.get(key, key), seeds=[r["seed"] for r in rows])
        if "trained_parameters" in rows[0]:
            entry.update(trained_parameters=rows[0]["trained_parameters"],
                         total_parameters=rows[0]["total_parameters"])
        table[key] = entry
    return table


def frontier(runs: list[dict], methods: Sequence[Method]) -> Optional[dict]:
    """One point per SDFT lambda (mean and std of new-fact accuracy and forgetting, and each
    seed's counts), SFT and the known-only control as references, and the recommended lambda.

    ``None`` without an SFT run or an SDFT run.
    """
    sdft_methods = [m for m in methods if m.kl_weight > 0]
    by_key = {key: [r for r in runs if r["method"] == key] for key in dict.fromkeys(r["method"] for r in runs)}
    if not by_key.get("sft") or not any(by_key.get(m.key) for m in sdft_methods):
        return None

    def point(key: str) -> dict:
        rows = by_key[key]
        metrics = [run_metrics(r) for r in rows]
        finals = [r["history"][-1] for r in rows]
        return {"key": key, "seeds": [r["seed"] for r in rows],
                "new_facts": list(mean_std([m["new_facts"] for m in metrics])),
                "forgetting": list(mean_std([m["forgetting"] for m in metrics])),
                "new_facts_correct": [f["new_facts_correct"] for f in finals],
                "new_facts_n": [f["new_facts_n"] for f in finals],
                "old_facts_correct": [f["old_facts_correct"] for f in finals],
                "old_facts_n": [f["old_facts_n"] for f in finals]}

    sft = point("sft")
    points = []
    for m in sdft_methods:
        if not by_key.get(m.key):
            continue
        p = {"kl_weight": m.kl_weight, **point(m.key)}
        p["learns_vs_sft"] = _ratio(p["new_facts"][0], sft["new_facts"][0])
        p["forgets_vs_sft"] = _ratio(p["forgetting"][0], sft["forgetting"][0])
        p["learns_enough"] = p["new_facts"][0] >= LEARN_FRACTION * sft["new_facts"][0]
        points.append(p)
    eligible = [p for p in points if p["learns_enough"]]
    best = min(eligible, key=lambda p: p["forgetting"][0]) if eligible else None
    return {
        "rule": (f"least forgetting among the SDFT lambdas whose new-fact accuracy is at least "
                 f"{LEARN_FRACTION:.0%} of SFT's; the paper's effect: at most {FORGET_FRACTION:.2f}x "
                 "SFT's forgetting"),
        "sft": sft,
        "control": point("known_only") if by_key.get("known_only") else None,
        "points": points,
        "best_kl_weight": best["kl_weight"] if best else None,
        "best_forgets_at_most_a_third": (best["forgetting"][0] <= FORGET_FRACTION * sft["forgetting"][0]
                                         if best else None),
    }


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b else None


def _pm(stat: Sequence[float]) -> str:
    return f"{100 * stat[0]:.1f} ± {100 * stat[1]:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def format_table(table: dict) -> str:
    """The paper's Table 1 shape as Markdown: accuracies and forgetting in %, mean ± std."""
    lines = ["| stage 2 trains | parameters trained | task (known) | new facts | held-out old facts "
             "| forgetting (drop from peak) |", "|---|---:|---:|---:|---:|---:|"]
    for key, e in table.items():
        params = (f"{_count(e['trained_parameters'])} of {_count(e['total_parameters'])}"
                  if "trained_parameters" in e else "-")
        lines.append(f"| {e.get('label', key)} | {params} | {_pm(e['task'])} | {_pm(e['new_facts'])} "
                     f"| {_pm(e['old_facts'])} | {_pm(e['forgetting'])} |")
    return "\n".join(lines)


def format_frontier(front: Optional[dict]) -> str:
    """The frontier as Markdown plus the verdict line(s)."""
    if front is None:
        return "(no frontier: it needs an SFT row and at least one SDFT row)"
    sft = front["sft"]
    lines = ["| lambda | new facts | forgetting | new facts vs SFT | forgetting vs SFT | learns >= "
             f"{LEARN_FRACTION:.0%} of SFT |", "|---:|---:|---:|---:|---:|:---:|"]
    for p in front["points"]:
        lv = f"{p['learns_vs_sft']:.2f}x" if p["learns_vs_sft"] is not None else "-"
        fv = f"{p['forgets_vs_sft']:.2f}x" if p["forgets_vs_sft"] is not None else "-"
        lines.append(f"| {p['kl_weight']:g} | {_pm(p['new_facts'])} | {_pm(p['forgetting'])} | {lv} | {fv} "
                     f"| {'yes' if p['learns_enough'] else 'no'} |")
    lines.append(f"| SFT | {_pm(sft['new_facts'])} | {_pm(sft['forgetting'])} | 1.00x | 1.00x | |")
    if front["control"] is not None:
        c = front["control"]
        lines.append(f"| known-only control | {_pm(c['new_facts'])} | {_pm(c['forgetting'])} | | | |")
    lines.append("")
    best = front["best_kl_weight"]
    if best is None:
        lines.append(f"No lambda learns {LEARN_FRACTION:.0%} of what SFT learns.")
    else:
        p = next(p for p in front["points"] if p["kl_weight"] == best)
        verdict = "yes" if front["best_forgets_at_most_a_third"] else "no"
        # No ratio when SFT forgot nothing (a short run, a tiny split).
        ratio = f"{p['forgets_vs_sft']:.2f}x" if p["forgets_vs_sft"] is not None else "against"
        lines.append(f"Lambda that forgets least among those learning >= {LEARN_FRACTION:.0%} of SFT's new facts: "
                     f"{best:g} (forgets {100 * p['forgetting'][0]:.1f} points, {ratio} SFT's "
                     f"{100 * sft['forgetting'][0]:.1f}). At most a third of SFT's forgetting: {verdict}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(keys: Sequence[str]) -> dict:
    plt = _pyplot()
    sdft = [k for k in keys if k.startswith("sdft_")]
    shades = plt.get_cmap("viridis")
    fixed = {"sft": "tab:red", "known_only": "tab:gray", "attention_only": "tab:orange",
             "ffn_only": "tab:brown", "mlp_frozen": "tab:pink"}
    colors = {k: shades(0.15 + 0.7 * i / max(1, len(sdft) - 1)) for i, k in enumerate(sdft)}
    colors.update({k: v for k, v in fixed.items() if k in keys})
    return colors


def plot_curves(runs: list[dict], table: dict, path: Path) -> None:
    """Held-out and new-fact accuracy against stage-2 epoch: seed mean, band = min..max."""
    plt = _pyplot()
    colors = _colors(list(table))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharex=True)
    for key, entry in table.items():
        rows = [r for r in runs if r["method"] == key]
        width = min(len(r["history"]) for r in rows)
        epochs = [h["epoch"] for h in rows[0]["history"][:width]]
        for ax, metric in zip(axes, ("old_facts", "new_facts")):
            series = [[100 * h[metric] for h in r["history"][:width]] for r in rows]
            mean = [sum(col) / len(col) for col in zip(*series)]
            ax.plot(epochs, mean, label=entry["label"], color=colors.get(key), marker=".")
            ax.fill_between(epochs, [min(col) for col in zip(*series)], [max(col) for col in zip(*series)],
                            alpha=0.15, color=colors.get(key))
    axes[0].set_title("held-out old facts (their drop is the forgetting)")
    axes[1].set_title("new facts (learning)")
    for ax in axes:
        ax.set_xlabel("stage-2 epoch")
        ax.set_ylabel("exact match (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(labels) + 2) // 3), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tradeoff(table: dict, front: Optional[dict], path: Path) -> None:
    """New-fact accuracy against forgetting: one point per SDFT lambda (error bars: std over
    seeds), SFT, the control and the freezing rows; the target region shaded."""
    plt = _pyplot()
    colors = _colors(list(table))
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    markers = {"sft": "*", "known_only": "s", "attention_only": "^", "ffn_only": "v", "mlp_frozen": "D"}
    sdft_keys = [k for k in table if k.startswith("sdft_")]
    if len(sdft_keys) > 1:
        ax.plot([100 * table[k]["forgetting"][0] for k in sdft_keys],
                [100 * table[k]["new_facts"][0] for k in sdft_keys], color="tab:green", alpha=0.4, zorder=1)
    for key, e in table.items():
        x, y = 100 * e["forgetting"][0], 100 * e["new_facts"][0]
        ax.errorbar(x, y, xerr=100 * e["forgetting"][1], yerr=100 * e["new_facts"][1],
                    fmt=markers.get(key, "o"), color=colors.get(key), markersize=10 if key == "sft" else 7,
                    capsize=3, label=e["label"], zorder=3)
        if key.startswith("sdft_"):
            ax.annotate(f"λ={key[5:]}", (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8)
    if front is not None:
        sft = front["sft"]
        learn, forget = 100 * LEARN_FRACTION * sft["new_facts"][0], 100 * FORGET_FRACTION * sft["forgetting"][0]
        ax.axhline(learn, color="gray", ls="--", lw=0.8)
        ax.axvline(forget, color="gray", ls=":", lw=0.8)
        xlim, ylim = ax.get_xlim(), ax.get_ylim()
        ax.fill_between([xlim[0], forget], learn, ylim[1], color="tab:green", alpha=0.08, zorder=0,
                        label=f"target: >= {LEARN_FRACTION:.0%} of SFT's new facts, <= 1/3 of its forgetting")
        ax.set_xlim(xlim)
        ax.set_ylim(ylim)
    ax.set_xlabel("forgetting: drop of held-out old-fact accuracy from its peak (points)")
    ax.set_ylabel("new-fact accuracy after stage 2 (%)")
    ax.set_title("learning vs forgetting (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
