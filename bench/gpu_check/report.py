"""Render a GPU check's JSON (:mod:`bench.gpu_check`) as markdown, and its plots on request.

    python -m bench.gpu_check.report bench/results/gpu-check-DATE.json           # the .md
    python -m bench.gpu_check.report bench/results/gpu-check-DATE.json --plots   # and PNGs

Everything shown comes from the JSON alone, so this runs anywhere (the plots need matplotlib,
which a GPU machine may lack: render them afterwards on any computer). A partial file (a
check stopped part-way) renders too. The plots, next to the JSON: ``<stem>-headline.png``
(time and peak memory per contender at the headline shape) and ``<stem>-train-step.png``
(the training step per precision).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..loss.contenders import CONTENDERS
from ..driver.files import render_beside
from ..driver.fmt import fmt_bytes
from ..loss.report import case_table, target_lines
from ..loss.shapes import CE_FWD_BWD, FWD_BWD


def _cell(text) -> str:
    return str(text if text is not None else "-").replace("|", "/").replace("\n", " ")


def _part_outcome(p: dict) -> str:
    if p["name"] in ("correctness", "behaviour") and p.get("counts"):
        counts = ", ".join(f"{n} {k}" for k, n in sorted(p["counts"].items()))
        return counts + (f"; {p['reason']}" if p.get("reason") else "")
    if p["name"] == "headline" and p.get("targets"):
        verdicts = [("PASS" if t["passed"] else "FAIL") if t["passed"] is not None else "n/a"
                    for t in p["targets"]]
        return f"targets: {', '.join(verdicts)}" + (f"; {p['reason']}" if p.get("reason") else "")
    return p.get("reason") or ""


def _setup_section(p: dict) -> list:
    probe = p.get("probe") or {}
    out = []
    dev = probe.get("device")
    if dev:
        out.append(f"- Device: {dev['name']} (compute capability {dev['capability']}, "
                   f"{fmt_bytes(dev['memory_bytes'])}, {dev['count']} visible, bf16 "
                   f"{'supported' if dev['bf16'] else 'NOT supported'}).")
    elif probe:
        out.append(f"- No CUDA device: {probe.get('torch_error') or 'torch.cuda.is_available() is False'}.")
    if probe:
        out.append(f"- Python {probe.get('python')}; torch {probe.get('torch')} (CUDA "
                   f"{probe.get('torch_cuda')}); impl='auto' on CUDA runs "
                   f"{probe.get('cuda_default_impl', '?')!r}.")
        versions = probe.get("versions", {})
        out.append("- Versions: " + ", ".join(f"{k} {v or 'absent'}" for k, v in versions.items()) + ".")
        missing = [m for m, ok in probe.get("importable", {}).items() if not ok]
        out.append(f"- Not importable: {', '.join(missing) or 'none'}.")
        ci = probe.get("check_imports", {})
        out.append(f"- The check's modules: {len(ci.get('imported', []))} imported"
                   + (f", failed: {ci['failed']}" if ci.get("failed") else "")
                   + f"; datasets/trl pulled in: {', '.join(ci.get('pulled_in') or []) or 'no'}.")
    wheels = p.get("wheels") or {}
    if wheels:
        out.append(f"- Carried wheels: installed {', '.join(wheels.get('installed') or []) or 'none'}"
                   + (f"; already here: {', '.join(f'{k} {v}' for k, v in wheels['present'].items())}"
                      if wheels.get("present") else "")
                   + (f"; FAILED: {wheels['failed']}" if wheels.get("failed") else "") + ".")
    if p.get("nvidia_smi"):
        out += ["", "```", p["nvidia_smi"], "```"]
    return out


def _tests_section(p: dict) -> list:
    out = []
    if p.get("command"):
        workers = p.get("workers", 1)
        out.append(f"{len(p.get('tests', []))} test(s) reported ({p.get('selected_expected')} "
                   f"selected by design), {workers} process(es), per-test timeout "
                   f"{p.get('per_test_timeout_s') or 'none'}; pytest exit code {p.get('exit_code')}.")
    if p.get("note"):
        out.append(f"Note: {p['note']}.")
    if p.get("tests"):
        out += ["", "| test | outcome | time | message |", "|---|---|---:|---|"]
        out += [f"| {_cell(t['id'])} | {t['outcome']} | {t['duration_s']:.1f} s | "
                f"{_cell((t.get('message') or '')[:200])} |" for t in p["tests"]]
    return out


def _headline_section(p: dict) -> list:
    if not p.get("cases"):
        return []
    s = p["shape"]
    out = [f"{s.get('model')} head, N={s['N']} D={s['D']} V={s['V']}, {p['dtype']}; "
           f"{p['warmup']} warm-up + median of {p['repeats']} timed calls, each case in a fresh "
           f"process; memory: {p['memory']}; objective: {p['objective']}.", "",
           "Targets (forward + backward):", ""]
    out += target_lines(p.get("targets") or []) or ["- none evaluable"]
    cases = [c for c in p["cases"] if c["status"] != "pending"]
    for group, title in ((FWD_BWD, "Forward + backward, CE + lambda tau^2 KL"),
                         (CE_FWD_BWD, "Cross-entropy only (no teacher), forward + backward")):
        rows = [c for c in cases if c["group"] == group]
        if rows:
            out += ["", f"#### {title}", ""] + case_table(rows, group)
    not_timed = [c for c in cases if c["status"] != "ok"]
    if not_timed:
        out += ["", "| group | contender | status | reason |", "|---|---|---|---|"]
        out += [f"| {c['group']} | {c['contender']} | {c['status']} | {_cell(c.get('reason'))} |"
                for c in not_timed]
    pending = [c for c in p["cases"] if c["status"] == "pending"]
    if pending:
        out += ["", f"Never reached: {', '.join(c['group'] + ' ' + c['contender'] for c in pending)}."]
    if p.get("peer_problems"):
        out += ["", "Peers' problems (not ours): " + "; ".join(p["peer_problems"])]
    names = dict.fromkeys(c["contender"] for c in p["cases"])
    out += ["", "Contenders: " + "; ".join(f"{CONTENDERS[n].title}: {CONTENDERS[n].settings}"
                                           for n in names if n in CONTENDERS) + "."]
    return out


def _fsdp_section(p: dict) -> list:
    variants = p.get("variants") or {"sdft_model": p}
    out = []
    for way, v in variants.items():
        if v.get("loss") is None:
            out.append(f"- {way}: {v.get('status')}: {v.get('reason')}")
            continue
        grad = f", LM head gradient rel. err {v['grad_rel_err']:.1e}" if "grad_rel_err" in v else ""
        out.append(f"- {way}: {p.get('model')} ({v.get('dtype')}, {p.get('sequences')} x {p.get('seq_len')} "
                   f"tokens) wrapped as {v.get('wrapped_as')}: loss {v['loss']:.6g} against "
                   f"{v['oracle_loss']:.6g} unsharded (rel. err {v['loss_rel_err']:.1e}){grad}: {v.get('status')}.")
    return out


def _train_step_section(p: dict) -> list:
    from ..train_step.report import case_table as step_table

    out = []
    for run in p.get("runs") or []:
        out += ["", f"#### {run['title']}: {run['status']}"
                + (f" ({run['reason']})" if run.get("reason") else ""), ""]
        results = run.get("results")
        if not results:
            continue
        meta = results["meta"]
        out.append(f"{meta['sequences']} x {meta['seq_len']} tokens, {meta['warmup']} warm-up + "
                   f"median of {meta['repeats']} interleaved rounds; memory: {meta['memory']}.")
        out += [""] + step_table(results["cases"])
        bad = [c for c in results["cases"] if c["status"] != "ok"]
        out += [f"- {c['case']}: {c['status']}: {c.get('reason')}" for c in bad]
    return out


SECTIONS = {"setup": _setup_section, "correctness": _tests_section, "behaviour": _tests_section,
            "headline": _headline_section, "fsdp": _fsdp_section, "train_step": _train_step_section}


def render_markdown(results: dict, plot_names=()) -> str:
    meta, parts = results["meta"], results["parts"]
    setup = next((p for p in parts if p["name"] == "setup"), {})
    dev = (setup.get("probe") or {}).get("device")
    out = [f"# GPU check, {meta['date']}: {dev['name'] if dev else 'no CUDA device'}", ""]
    if not meta.get("complete"):
        done = sum(1 for p in parts if p["status"] not in ("pending", "running"))
        out += [f"**Partial results**: the check stopped after {done} of {len(parts)} parts "
                f"({meta.get('elapsed_s')} s in).", ""]
    out += [f"- Commit {meta.get('commit') or '?'}{' (uncommitted changes)' if meta.get('dirty') else ''}; "
            f"started {meta.get('started')}; took {meta.get('elapsed_s')} s of a "
            f"{meta.get('deadline_s'):.0f} s deadline; command: `{meta.get('command')}`.",
            "- Files: " + ", ".join(meta.get("files") or []) + ".",
            f"- Plots: `python -m bench.gpu_check.report {meta.get('stem')}.json --plots` "
            "(anywhere with matplotlib).", "",
            "| part | status | time / budget | outcome |", "|---|---|---:|---|"]
    for p in parts:
        used = "-" if p.get("elapsed_s") is None else f"{p['elapsed_s']:.0f} s"
        budget = p.get("budget_given_s", p["budget_s"])
        out.append(f"| {p['title']} | {p['status']} | {used} / {budget:.0f} s | "
                   f"{_cell(_part_outcome(p)[:300])} |")
    for p in parts:
        body = SECTIONS.get(p["name"], lambda _: [])(p)
        if p["status"] in ("pending", "skipped") and not body:
            continue
        out += ["", f"## {p['title']}", "", f"Status: **{p['status']}**"
                + (f": {p['reason']}" if p.get("reason") else "") + "."]
        if body:
            out += [""] + body
        if p.get("traceback"):
            out += ["", "```", p["traceback"].rstrip(), "```"]
    if plot_names:
        out += ["", "## Plots", ""] + [f"![{n}]({n})" for n in plot_names]
    out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- plots

def write_plots(results: dict, out_dir: Path, stem: str) -> list:
    """``<stem>-headline.png`` and ``<stem>-train-step.png`` where there is something to plot."""
    parts = {p["name"]: p for p in results["parts"]}
    paths = []
    head = _headline_plot(parts.get("headline") or {}, Path(out_dir) / f"{stem}-headline.png")
    if head:
        paths.append(head)
    step = _train_step_plot(parts.get("train_step") or {}, Path(out_dir) / f"{stem}-train-step.png")
    if step:
        paths.append(step)
    return paths


def _headline_plot(part: dict, path: Path):
    groups = [(g, [c for c in part.get("cases") or [] if c["group"] == g and c["status"] == "ok"])
              for g in (FWD_BWD, CE_FWD_BWD)]
    groups = [(g, cs) for g, cs in groups if cs]
    if not groups:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sum(len(cs) for _, cs in groups)
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 1.4 + 0.45 * rows), squeeze=False)
    for row, (group, cs) in zip(axes, groups):
        labels = [CONTENDERS[c["contender"]].title if c["contender"] in CONTENDERS else c["contender"]
                  for c in cs]
        colours = ["0.55" if c["contender"] == "floor" else
                   ("C0" if c["contender"].startswith("ours") else "C1") for c in cs]
        for ax, field, ratio, unit, scale in (
                (row[0], "median_s", "time_over_floor", "time, median (ms)", 1e-3),
                (row[1], "mem_bytes", "mem_over_reference", "peak memory (GiB)", 2**30)):
            keep = [(lab, col, c) for lab, col, c in zip(labels, colours, cs)
                    if c.get(field) is not None
                    and not (field == "mem_bytes" and c["contender"] == "floor")]
            ys = range(len(keep))
            values = [c[field] / scale for _, _, c in keep]
            ax.barh(list(ys), values, color=[col for _, col, _ in keep])
            ax.set_yticks(list(ys), [lab for lab, _, _ in keep], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(unit, fontsize=9)
            for y, v, (_, _, c) in zip(ys, values, keep):
                if c.get(ratio) is not None:
                    ax.text(v, y, f" {c[ratio]:.2f}x", va="center", fontsize=8)
            ax.set_xlim(0, max(values or [1]) * 1.3)
            ax.grid(True, axis="x", alpha=0.3)
        row[0].set_title({FWD_BWD: "forward + backward, CE + KL (ratio: x floor)",
                          CE_FWD_BWD: "cross-entropy only (ratio: x floor)"}[group], fontsize=9, loc="left")
        row[1].set_title("ratio: x reference", fontsize=9, loc="left")
    s = part["shape"]
    fig.suptitle(f"{s.get('model')} head, N={s['N']} D={s['D']} V={s['V']}, {part['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _train_step_plot(part: dict, path: Path):
    from ..train_step.report import write_plot

    cases, meta = [], None
    for run in part.get("runs") or []:
        results = run.get("results")
        if not results:
            continue
        meta = meta or dict(results["meta"])
        # One row per precision: write_plot draws one row per model.
        cases += [dict(c, model=run["precision"], model_title=run["title"]) for c in results["cases"]]
    if not cases:
        return None
    meta["dtype"] = " / ".join(r["precision"] for r in part["runs"] if r.get("results"))
    return write_plot({"meta": meta, "cases": cases}, path)


def render(json_path: Path, plots: bool = False) -> tuple:
    """Write ``<stem>.md`` (and with ``plots`` the PNGs) next to ``json_path``."""
    return render_beside(json_path, render_markdown, write_plots if plots else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--plots", action="store_true", help="also write the PNGs (needs matplotlib)")
    args = parser.parse_args(argv)
    md, pngs = render(args.json, args.plots)
    print(f"wrote {md}" + "".join(f", {p}" for p in pngs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
