"""The real-model study's own tables, beside the toy demo's (:mod:`sdft.demo.report`):

- what the base model knows, per relation, and the split sizes;
- SliCK category shifts during stage 2: of the held-out facts Known when stage 2 starts, how many
  are still Known at its end, how many only "maybe" (a sample still finds them), how many Unknown;
  of the new facts, how many became Known;
- accuracy per relation: held-out at the start and end of stage 2, new facts at the end.

Counts are per run, then averaged over seeds. A run's history holds each fact's class per
evaluation as one letter (``K``, ``M``, ``U``) per fact, in split order (see
:func:`sdft.demo.real.stages.run_stage2`).
"""

from __future__ import annotations

from typing import Sequence

from sdft.demo.methods import Method

CLASS_NAMES = {"K": "known", "M": "maybe", "U": "unknown"}


def _runs_by_method(runs: list[dict], methods: Sequence[Method]) -> dict[str, list[dict]]:
    keys = [m.key for m in methods] or list(dict.fromkeys(r["method"] for r in runs))
    return {k: [r for r in runs if r["method"] == k] for k in keys if any(r["method"] == k for r in runs)}


def transitions(start: str, end: str) -> dict[str, dict[str, int]]:
    """Counts ``{from_class: {to_class: n}}`` between two class strings of one split."""
    if len(start) != len(end):
        raise ValueError(f"class strings of different lengths: {len(start)} and {len(end)}")
    out = {a: {b: 0 for b in CLASS_NAMES.values()} for a in CLASS_NAMES.values()}
    for a, b in zip(start, end):
        out[CLASS_NAMES[a]][CLASS_NAMES[b]] += 1
    return out


def category_shifts(runs: list[dict], methods: Sequence[Method]) -> dict:
    """Per method: the mean over seeds of :func:`transitions` from the first to the last
    evaluation of stage 2, for the held-out (``old_facts``) and new (``new_facts``) facts."""
    out = {}
    for key, rows in _runs_by_method(runs, methods).items():
        entry = {}
        for label in ("old_facts", "new_facts"):
            per_seed = [transitions(r["history"][0]["classes"][label], r["history"][-1]["classes"][label])
                        for r in rows]
            entry[label] = {a: {b: sum(t[a][b] for t in per_seed) / len(per_seed) for b in CLASS_NAMES.values()}
                            for a in CLASS_NAMES.values()}
        entry["label"] = next((m.label for m in methods if m.key == key), key)
        out[key] = entry
    return out


def by_relation(runs: list[dict], methods: Sequence[Method]) -> dict:
    """Per method and relation, means over seeds: held-out correct at the start and end of stage 2
    and the lowest along the way, new facts correct at the end, and the split sizes."""
    out = {}
    for key, rows in _runs_by_method(runs, methods).items():
        relations = list(rows[0]["history"][0]["old_facts_by_relation"])
        entry = {}
        for rel in relations:
            def mean(values):
                return sum(values) / len(values)

            old = [[h["old_facts_by_relation"][rel][0] for h in r["history"]] for r in rows]
            entry[rel] = {"old_start": mean([o[0] for o in old]), "old_end": mean([o[-1] for o in old]),
                          "old_peak": mean([max(o) for o in old]),
                          "old_n": rows[0]["history"][0]["old_facts_by_relation"][rel][1],
                          "new_end": mean([r["history"][-1]["new_facts_by_relation"].get(rel, [0, 0])[0] for r in rows]),
                          "new_n": rows[0]["history"][0]["new_facts_by_relation"].get(rel, [0, 0])[1]}
        out[key] = {"label": next((m.label for m in methods if m.key == key), key), "relations": entry}
    return out


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}" if whole else "-"


def knowledge_table(counts: dict[str, dict[str, int]], split_sizes: dict[str, dict[str, int]]) -> str:
    """What the base model knows per relation (SliCK, few-shot) and the splits drawn from it."""
    lines = ["| relation | facts | known | maybe | unknown | train known | train unknown | held-out known |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for rel, c in counts.items():
        s = split_sizes[rel]
        lines.append(f"| {rel} | {c['total']} | {c['known']} ({_share(c['known'], c['total'])}%) | {c['maybe']} | "
                     f"{c['unknown']} | {s['train_known']} | {s['train_unknown']} | {s['heldout_known']} |")
    return "\n".join(lines)


def format_shifts(shifts: dict) -> str:
    """Category shifts as Markdown: shares of the facts in each starting class, in %."""
    lines = ["| stage 2 trains | held-out Known at start: still Known | -> maybe | -> Unknown | held-out not Known "
             "at start -> Known | new facts Unknown at start: -> Known | -> maybe | still Unknown |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in shifts.values():
        old, new = e["old_facts"], e["new_facts"]
        known = sum(old["known"].values())
        not_known = sum(old["maybe"].values()) + sum(old["unknown"].values())
        regained = old["maybe"]["known"] + old["unknown"]["known"]
        unknown = sum(new["unknown"].values())
        lines.append(f"| {e['label']} | {_share(old['known']['known'], known)} | {_share(old['known']['maybe'], known)} "
                     f"| {_share(old['known']['unknown'], known)} | {regained:g} of {not_known:g} "
                     f"| {_share(new['unknown']['known'], unknown)} | {_share(new['unknown']['maybe'], unknown)} "
                     f"| {_share(new['unknown']['unknown'], unknown)} |")
    return "\n".join(lines)


def format_relations(relations: dict) -> str:
    """Per relation: held-out exact match at the start -> end of stage 2, new facts at the end (%)."""
    if not relations:
        return ""
    names = list(next(iter(relations.values()))["relations"])
    header = "| stage 2 trains | " + " | ".join(f"{n}: held-out start -> end | {n}: new facts" for n in names) + " |"
    lines = [header, "|---|" + "---:|---:|" * len(names)]
    for e in relations.values():
        cells = []
        for n in names:
            r = e["relations"][n]
            cells.append(f"{_share(r['old_start'], r['old_n'])} -> {_share(r['old_end'], r['old_n'])} (of {r['old_n']})")
            cells.append(f"{_share(r['new_end'], r['new_n'])} (of {r['new_n']})")
        lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
