"""Render a training-step results JSON (:mod:`bench.train_step`) as markdown and one PNG.

``python -m bench.train_step.report bench/results/train-step-cpu-DATE.json`` re-renders both
next to the JSON, from the JSON alone; a partial file (a run stopped part-way) renders too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from ..driver.fmt import fmt_ratio, fmt_time
from .cases import CASES, SETTINGS

BREAKDOWN = (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "AdamW state"),
             ("teacher", "teacher"), ("activations", "activations"),
             ("loss_and_rest", "loss and rest"))


def _title(name: str) -> str:
    return CASES[name].title if name in CASES else name


def target_lines(targets: list) -> list:
    lines = []
    for t in targets:
        sign = "<" if t.get("strict") else "<="
        if t["passed"] is None:
            lines.append(f"- n/a  {t['name']} {sign} {t['limit']}: {t['note']}")
            continue
        verdict = "PASS" if t["passed"] else "FAIL"
        lines.append(f"- {verdict} {t['name']} = {t['value']:.3f} (target {sign} {t['limit']})")
    return lines


def fmt_mem(b) -> str:
    """Bytes as GiB with two decimals from 1 GiB up, else whole MiB."""
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def _versus(c: dict, metric: str) -> str:
    v = c.get(f"{metric}_over_versus")
    return "-" if v is None else f"{fmt_ratio(v)} {c['versus']}"


def case_table(rows: list) -> list:
    out = ["| case | step time (median) | x SFT | peak memory | x SFT | time, memory x 2nd baseline "
           "| loss, step 1 |",
           "|---|---:|---:|---:|---:|---|---:|"]
    for c in rows:
        if c["status"] != "ok":
            continue
        loss = "-" if c.get("first_loss") is None else f"{c['first_loss']:.4f}"
        second = ("-" if c.get("time_over_versus") is None else
                  f"{fmt_ratio(c['time_over_versus'])}, {fmt_ratio(c['mem_over_versus'])} "
                  f"{c['versus']}")
        out.append(f"| {_title(c['case'])} | {fmt_time(c['median_s'])} | "
                   f"{fmt_ratio(c.get('time_over_sft'))} | {fmt_mem(c['mem_bytes'])} | "
                   f"{fmt_ratio(c.get('mem_over_sft'))} | {second} | {loss} |")
    return out


def _parts_table(rows: list, field: str, columns: tuple, unit: str, fmt, last_title: str, last) -> list:
    """A table with one row per measured case that has ``field``: the parts named by
    ``columns`` (key, title), each as ``fmt`` writes it, and a last column ``last(case)``."""
    out = [f"| case ({unit}) | " + " | ".join(t for _, t in columns) + f" | {last_title} |",
           "|---|" + "---:|" * (len(columns) + 1)]
    for c in rows:
        parts = c.get(field)
        if c["status"] == "ok" and parts:
            out.append(f"| {_title(c['case'])} | " + " | ".join(fmt(parts.get(k)) for k, _ in columns)
                       + f" | {last(c)} |")
    return out


def breakdown_table(rows: list) -> list:
    return _parts_table(rows, "breakdown", BREAKDOWN, "MiB", _mib, "peak measured",
                        lambda c: _mib(c["mem_bytes"]))


PHASE_TITLES = (("student_forward", "student decoder fwd"),
                ("teacher_forward", "teacher decoder fwd"),
                ("head_and_loss", "LM heads + loss fwd"),
                ("backward", "backward"), ("optimizer", "AdamW"))


def phase_table(rows: list) -> list:
    """Where a step's time goes, from the one instrumented step per case (seconds); empty when
    no case has it."""
    out = _parts_table(rows, "phases_s", PHASE_TITLES, "s", "{:.2f}".format, "sum",
                       lambda c: f"{sum(c['phases_s'][k] for k, _ in PHASE_TITLES):.2f}")
    return out if len(out) > 2 else []


def render_markdown(results: dict, png_name: Optional[str] = None) -> str:
    meta, all_cases = results["meta"], results["cases"]
    cases = [c for c in all_cases if c["status"] != "pending"]
    pending = [c for c in all_cases if c["status"] == "pending"]
    precision = meta["dtype"] + (f" weights, {meta['autocast']} autocast" if meta.get("autocast") else "")
    out = [f"# Training-step cost: {meta['device']} {precision}, {meta['date']}", ""]
    if meta.get("complete") is False:
        out += [f"**Partial results**: the run stopped after {len(cases)} of "
                f"{meta.get('cases_planned', len(all_cases))} planned cases; "
                f"{len(pending)} were never reached.", ""]
    load = ", ".join(str(x) for x in meta.get("load_average_start") or []) or "?"
    load_end = ", ".join(str(x) for x in meta.get("load_average_end") or []) or "?"
    out += [
        f"- Device: {meta.get('device_name', '?')}; {meta.get('threads', '?')} threads; load "
        f"average (1, 5, 15 min) {load} at the start, {load_end} at the end.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        f"- Step: one optimizer step (forward, backward, AdamW) on {meta['sequences']} x "
        f"{meta['seq_len']} tokens; {meta['objective']}.",
        f"- Time: median of {meta['repeats']} rounds after {meta['warmup']} warm-up step(s) per "
        "case; in each round every case of a model steps once, interleaved in one process "
        "(the order rotates), so background load falls on all alike. Ratios are taken within "
        "this one run, against the same model's SFT step.",
        f"- Memory: {meta['memory']}.",
        f"- Commit: {meta.get('commit', '?')}{' (uncommitted changes)' if meta.get('dirty') else ''}; "
        f"command: `{meta.get('command', '')}`.",
    ]
    if meta.get("budget_s") is not None:
        out.append(f"- Time budget: {meta['budget_s']:g} s (no case starts after it); the run "
                   f"took {meta.get('elapsed_s', '?')} s.")
    out += ["", "## Targets", ""]
    targets = results.get("targets") or []
    if targets and targets[0].get("model"):
        out += [f"On {targets[0]['model']}:", ""]
    out += target_lines(targets) or ["- none defined for this device"]
    out.append("")

    for model in dict.fromkeys(c["model"] for c in cases):
        rows = [c for c in cases if c["model"] == model]
        title = rows[0].get("model_title") or ""
        out += [f"## {model}: {title}{' (headline)' if rows[0].get('headline') else ''}", ""]
        out += case_table(rows) + [""]
        out += ["Memory breakdown (estimate; see bench/train_step/measure.py):", ""]
        out += breakdown_table(rows) + [""]
        phases = phase_table(rows)
        if phases:
            out += ["Where the step's time goes (one more step per case, instrumented after the "
                    "timed rounds; the decoders' forwards timed by hooks, the LM heads and the "
                    "loss are the rest of the forward; a cached teacher's lookup counts there):",
                    ""] + phases + [""]
        once = [c for c in rows if c.get("cache_build_s")]
        for c in once:
            out += [f"Building the hidden-state cache (once, before training; not in the step "
                    f"time): {fmt_time(c['cache_build_s'])}.", ""]

    not_run = [c for c in cases if c["status"] != "ok"]
    if not_run:
        out += ["## Not measured", "", "| model | case | status | reason |", "|---|---|---|---|"]
        out += [f"| {c['model']} | {_title(c['case'])} | {c['status']} | "
                f"{(c.get('reason') or '').replace('|', '/')} |" for c in not_run]
        out.append("")
    if pending:
        out += ["## Never reached", ""] + [f"- {c['model']} {c['case']}" for c in pending] + [""]
    out += ["## How each case is built", ""]
    out += [f"- {_title(name)}: {SETTINGS[name]}" for name in
            dict.fromkeys(c["case"] for c in all_cases) if name in SETTINGS]
    out.append("")
    if png_name:
        out += [f"![step time and peak memory per case]({png_name})", ""]
    return "\n".join(out)


def write_plot(results: dict, path: Path) -> Optional[Path]:
    """Bars of step time and peak memory per case, one row per model; None if nothing ran."""
    ok = [c for c in results["cases"] if c["status"] == "ok"]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_names = list(dict.fromkeys(c["model"] for c in ok))
    fig, axes = plt.subplots(len(model_names), 2, figsize=(12, 1.2 + 2.6 * len(model_names)),
                             squeeze=False)
    for row, model in zip(axes, model_names):
        cs = [c for c in ok if c["model"] == model]
        labels = [_title(c["case"]) for c in cs]
        colours = ["0.55" if c["case"] == "sft_hf" else ("C3" if c["case"] == "sdft_naive" else
                   ("C1" if CASES.get(c["case"]) and CASES[c["case"]].lora else "C0")) for c in cs]
        for ax, field, ratio, unit, scale in (
                (row[0], "median_s", "time_over_sft", "step time, median (s)", 1.0),
                (row[1], "mem_bytes", "mem_over_sft", "peak memory (GiB)", 2**30)):
            values = [c[field] / scale for c in cs]
            ys = range(len(cs))
            ax.barh(ys, values, color=colours)
            ax.set_yticks(list(ys), labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(unit, fontsize=9)
            for y, v, c in zip(ys, values, cs):
                if c.get(ratio) is None:
                    continue
                text = f" {c[ratio]:.2f}x"
                second = c.get(ratio.replace("_sft", "_versus"))
                if second is not None and CASES[c["case"]].lora:  # its own baseline: LoRA SFT
                    text += f" ({second:.2f}x LoRA SFT)"
                ax.text(v, y, text, va="center", fontsize=8)
            ax.set_xlim(0, max(values) * 1.3)
            ax.grid(True, axis="x", alpha=0.3)
        row[0].set_title(f"{model}: {cs[0].get('model_title', '')}", fontsize=9, loc="left")
    meta = results["meta"]
    fig.suptitle(f"One training step, {meta['device']} {meta['dtype']}, {meta['sequences']} x "
                 f"{meta['seq_len']} tokens, {meta['date']} (ratios: x the SFT step)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(json_path: Path) -> tuple:
    """Write ``<stem>.md`` and ``<stem>.png`` next to ``json_path``; returns the markdown's
    path and a list of the plot's (empty when no case ran)."""
    json_path = Path(json_path)
    results = json.loads(json_path.read_text())
    png = write_plot(results, json_path.with_suffix(".png"))
    md_path = json_path.with_suffix(".md")
    md_path.write_text(render_markdown(results, png.name if png else None))
    return md_path, [png] if png else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    args = parser.parse_args(argv)
    md, _ = render(args.json)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
