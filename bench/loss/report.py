"""Render a results JSON (written by :mod:`bench.loss`) as markdown, with target lines.

``python -m bench.loss.report bench/results/cpu-2026-11-26.json`` re-renders the markdown and the
plots next to the JSON; everything shown is computed from the JSON alone. A partial file (a
run killed part-way: ``meta.complete`` false, the cases it never reached "pending") renders
too, marked partial.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from ..driver.files import render_beside
from ..driver.fmt import fmt_bytes, fmt_ratio, fmt_time
from .contenders import CONTENDERS
from .plan import warmup_calls
from .shapes import CE_FWD_BWD, FWD, FWD_BWD

GROUP_TITLES = {
    FWD_BWD: "Forward + backward, CE + lambda tau^2 KL (headline group)",
    FWD: "Forward only, CE + lambda tau^2 KL (no gradients requested)",
    CE_FWD_BWD: "Cross-entropy only (no teacher), forward + backward",
}
FLOPS_LABEL = {FWD_BWD: "8NDV", FWD: "4NDV", CE_FWD_BWD: "6NDV"}


def fmt_rate(flops_per_s) -> str:
    if flops_per_s is None:
        return "-"
    if flops_per_s >= 1e12:
        return f"{flops_per_s / 1e12:.3g} TFLOP/s"
    return f"{flops_per_s / 1e9:.3g} GFLOP/s"


def fmt_agreement(c: dict) -> str:
    a = c.get("agreement")
    if c["contender"] == "floor":
        return "n/a (no loss)"
    if not a:
        return "not checked"
    if a.get("is_oracle"):
        return "oracle"
    def err(x):
        return "non-finite or missing" if x is None else f"{x:.1e}"

    errs = [f"loss {err(a['loss_rel_err'])}"]
    for name, short in (("grad_hidden_rel_err", "dh"), ("grad_weight_rel_err", "dW")):
        if name in a:
            errs.append(f"{short} {err(a[name])}")
    return ("agrees: " if a["agrees"] else "DISAGREES: ") + ", ".join(errs)


def _shape_key(c):
    return (c["N"], c["D"], c["V"])


def _title(name: str) -> str:
    return CONTENDERS[name].title if name in CONTENDERS else name


def _own_warmups(device: str, cases: list) -> str:
    """The contenders of this run that take extra warm-up calls of their own on CPU (their
    first call compiles), as a clause for the Time line; empty when there are none."""
    own = {n: warmup_calls(n, device, 0) for n in sorted({c["contender"] for c in cases}) if n in CONTENDERS}
    own = {n: calls for n, calls in own.items() if calls}
    if not own:
        return ""
    return " (" + ", ".join(f"{calls} more for {_title(n)}" for n, calls in own.items()) + \
        ": their first call compiles)"


def _paired_rounds(cases: list) -> str:
    """How many rounds the paired cases timed, as a clause for the x floor line."""
    rounds = sorted({len(c["floor_times_s"]) for c in cases if c.get("floor_times_s")})
    if not rounds:
        return ""
    span = str(rounds[0]) if rounds[0] == rounds[-1] else f"{rounds[0]}-{rounds[-1]}"
    return f" ({span} rounds after the probed call; their time is the median of the probed call and the rounds)"


def _shape_title(c) -> str:
    title = f"N={c['N']} D={c['D']} V={c['V']}"
    if c.get("model"):
        title = f"{c['model']} head, {title}"
    return title + (" (headline)" if c.get("headline") else "")


def target_lines(targets: list) -> list:
    lines = []
    for t in targets:
        if t["passed"] is None:
            lines.append(f"- n/a  {t['name']} <= {t['limit']}: {t['note']}")
            continue
        verdict = "PASS" if t["passed"] else "FAIL"
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"- {verdict} {t['name']} = {t['value']:.3f} (target <= {t['limit']}){note}")
    return lines


def case_table(cases: list, group: str) -> list:
    rows = [
        f"| contender | status | agreement (rel. err) | time (median) | x floor | floor beside it "
        f"| rate ({FLOPS_LABEL[group]}) | peak memory | x reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        mem = None if c["contender"] == "floor" else c.get("mem_bytes")
        rows.append("| " + " | ".join([
            _title(c["contender"]),
            c["status"],
            fmt_agreement(c) if c["status"] in ("ok", "disagrees") else "-",
            fmt_time(c.get("median_s")),
            fmt_ratio(c.get("time_over_floor")),
            fmt_time(statistics.median(c["floor_times_s"])) if c.get("floor_times_s") else "-",
            fmt_rate(c.get("flop_rate")),
            fmt_bytes(mem),
            fmt_ratio(c.get("mem_over_reference")),
        ]) + " |")
    return rows


def render_markdown(results: dict, plot_names: list = ()) -> str:
    meta, all_cases = results["meta"], results["cases"]
    # Cases a killed run never reached: counted, not tabulated.
    cases = [c for c in all_cases if c["status"] != "pending"]
    pending = [c for c in all_cases if c["status"] == "pending"]
    out = [f"# Benchmark results: {meta['device']} {meta['dtype']}, {meta['date']}", ""]
    if meta.get("complete") is False:
        out += [f"**Partial results**: the run stopped after {len(cases)} of "
                f"{meta.get('cases_planned', len(all_cases))} planned cases "
                f"({meta.get('elapsed_s', '?')} s in); {len(pending)} were never reached.", ""]
    out += [
        f"- Device: {meta.get('device_name', '?')}; torch {meta['versions'].get('torch')}, "
        f"{meta.get('threads', '?')} threads.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if k != "torch") + ".",
        f"- Objective: {meta['objective']}.",
        *([f"- Ours: impl=\"auto\", which runs impl=\"{meta['ours_impl']}\" on this device."]
          if meta.get("ours_impl") else []),
        f"- Time: median of {meta['repeats']} calls after {meta['warmup']} warm-up call(s)"
        f"{_own_warmups(meta['device'], cases)}; ratios are taken within this one run.",
        f"- Memory: {meta['memory']}.",
        "- x floor: where a contender timed the floor beside its own calls (\"floor beside it\", "
        "the median of those floor calls), the median over the rounds of its call over the floor call "
        f"right after it, in one process{_paired_rounds(cases)}; else its median over the floor row's.",
        f"- FLOP rates count the nominal GEMM FLOPs of the group over all N rows "
        "(8NDV forward+backward, 4NDV forward, 6NDV CE-only); the floor is those GEMMs "
        "with plain torch.matmul at the same shapes and dtype.",
        f"- Commit: {meta.get('commit', '?')}{' (uncommitted changes)' if meta.get('dirty') else ''}; "
        f"command: `{meta.get('command', '')}`.",
    ]
    if meta.get("budget_s") is not None:
        n_out = sum(1 for c in cases if (c.get("reason") or "").startswith("time budget of"))
        out.append(f"- Time budget: {meta['budget_s']:g} s (no case starts after it); "
                   f"{n_out} case(s) skipped for it; the run took {meta.get('elapsed_s', '?')} s.")
    out += [
        "",
        "## Targets",
        "",
    ]
    targets = results.get("targets", [])
    shape = next((t["shape"] for t in targets if t.get("shape")), None)
    if shape:
        out.append(f"At N={shape['N']} D={shape['D']} V={shape['V']}, forward + backward:")
        out.append("")
    out += target_lines(targets) or ["- none defined for this device"]
    out.append("")

    for group in (FWD_BWD, FWD, CE_FWD_BWD):
        in_group = [c for c in cases if c["group"] == group]
        if not in_group:
            continue
        out += [f"## {GROUP_TITLES[group]}", ""]
        for key in dict.fromkeys(_shape_key(c) for c in in_group):
            rows = [c for c in in_group if _shape_key(c) == key]
            out += [f"### {_shape_title(rows[0])}", ""] + case_table(rows, group) + [""]
            firsts = [f"{_title(c['contender'])} {fmt_time(c['first_call_s'])}" for c in rows
                      if c.get("first_call_s") is not None]
            if firsts:
                out += ["First call, one-time costs (compilation) included: " + ", ".join(firsts) + ".", ""]

    skipped = [c for c in cases if c["status"] != "ok"]
    if skipped:
        out += ["## Not timed", "", "| group | shape | contender | status | reason |", "|---|---|---|---|---|"]
        for c in skipped:
            out.append(f"| {c['group']} | N={c['N']} D={c['D']} V={c['V']} | {_title(c['contender'])} | "
                       f"{c['status']} | {(c.get('reason') or '').replace('|', '/')} |")
        out.append("")

    if pending:
        out += ["## Never reached", "",
                f"{len(pending)} planned case(s) did not finish: the run stopped before them."]
        first = pending[0]
        if (first.get("reason") or "").startswith("in progress"):  # see bench.loss
            out.append(f"In progress when it stopped: {first['group']} {_shape_title(first)}, "
                       f"{_title(first['contender'])}.")
        out += ["", "Shapes:", ""]
        for key in dict.fromkeys(_shape_key(c) for c in pending):
            rows = [c for c in pending if _shape_key(c) == key]
            groups = ", ".join(dict.fromkeys(c["group"] for c in rows))
            out.append(f"- {_shape_title(rows[0])}: {len(rows)} case(s) ({groups})")
        out.append("")

    out += ["## How each contender is configured", ""]
    for name in dict.fromkeys(c["contender"] for c in all_cases):
        if name in CONTENDERS:
            out.append(f"- {CONTENDERS[name].title}: {CONTENDERS[name].settings}")
    out.append("")
    if plot_names:
        out += ["## Plots (forward + backward)", ""]
        out += [f"![{name}]({name})" for name in plot_names] + [""]
    return "\n".join(out)


def render(json_path: Path) -> tuple[Path, list]:
    """Write ``<stem>.md`` and the plots next to ``json_path``; returns their paths."""
    from .plots import write_plots

    return render_beside(json_path, render_markdown, write_plots)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    args = parser.parse_args(argv)
    md, plots = render(args.json)
    print(md)
    for p in plots:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
