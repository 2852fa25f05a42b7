"""The fused loss as the backend of TRL's distillation trainers, against the backends it stands
in for: one training step's loss, on CPU.

The role: the full-vocabulary divergence of TRL's ``DistillationTrainer`` (and GKD), called
with Liger's signature ``loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
labels)``: ``weight_hard_loss=0, weight_soft_loss=1``, the generalised JSD at ``beta`` and
temperature ``T`` (no ``T**2``), the mean over the labelled tokens.

| contender | what runs |
|---|---|
| ``ours`` | ``sdft.fused_linear_jsd.FusedLinearJSDLoss`` (``impl="auto"``: the chunked torch path on CPU) |
| ``liger`` | ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(compiled=False)`` (eager on CPU, as ``bench.loss``) |
| ``trl_chunked`` | TRL 1.16's own backend of ``DistillationTrainer``: ``_chunked_divergence_loss`` (``ChunkedDivergenceFunction``, its torch path on CPU; it also sums the student entropy it logs) |
| ``materialised`` | TRL GKD's ``generalized_jsd_loss`` over full ``[N, V]`` logits |

Per case, in a fresh process: seeded inputs (``bench.loss.inputs.build_inputs``: hidden ~ N(0, 1),
head ~ N(0, 1/D), a teacher 10 % away, 20 % of labels ignored), one warm-up call, then one
probed call: its wall time and the growth of the process's peak resident set over it
(``bench.driver.probes.RssProbe``: inputs not counted, the gradients it creates counted). The
probed call's loss and gradients are then checked against a float64 oracle computed in row
blocks (TRL's ``generalized_jsd_loss`` per block); a case that disagrees is reported as such.
One run per case: on a shared machine, read the times as rough.

    python -m bench.loss.trl_backend                         # N=2048, D=512, V=32768; beta 0.5 and 1
    python -m bench.loss.trl_backend --shape 1024,256,8192 --betas 0.5 --out /tmp/x   # smaller

Writes ``trl-backend-cpu-<date>.json`` and ``.md`` (with the command and the load average; a
second run that day ``-2``, ``-3``...)
into ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ..driver.files import RESULTS_DIR
from ..driver.loop import results_path, today
from ..driver.meta import device_name, load_average
from ..driver.processes import in_fresh_process

RESULT_MARKER = "TRL_BACKEND_RESULT "
CASE_TIMEOUT_S = 1800
CONTENDERS = ("ours", "liger", "trl_chunked", "materialised")
TEMPERATURE = 1.0  # the default of TRL's DistillationConfig and of Liger
ORACLE_BLOCK_ROWS = 256
# fp32 against the float64 oracle: the loss, and each gradient relative to its norm.
TOLERANCE = {"loss": 1e-4, "grad": 1e-3}


def _step(name: str, inputs, beta: float):
    """A function running one forward + backward of contender ``name``; returns the loss."""
    h, w, ht, wt, labels = inputs.hidden, inputs.weight, inputs.teacher_hidden, inputs.teacher_weight, inputs.labels
    if name == "ours":
        from sdft.fused_linear_jsd import FusedLinearJSDLoss

        loss_fn = FusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=TEMPERATURE)
        compute = lambda: loss_fn(h, w, ht, wt, labels)  # noqa: E731
    elif name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                          temperature=TEMPERATURE, compiled=False)
        compute = lambda: loss_fn(h, w, ht, wt, labels)  # noqa: E731
    elif name == "trl_chunked":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        mask = (labels != -100)[None]
        compute = lambda: _chunked_divergence_loss(h[None], ht[None], w, wt, mask, beta,  # noqa: E731
                                                   temperature=TEMPERATURE)[0]
    elif name == "materialised":
        from trl.experimental.gkd import GKDTrainer

        compute = lambda: GKDTrainer.generalized_jsd_loss(  # noqa: E731
            (h @ w.T)[None], (ht @ wt.T)[None], labels=labels[None], beta=beta, temperature=TEMPERATURE)
    else:
        raise ValueError(f"unknown contender {name!r}; one of {CONTENDERS}")

    def step():
        loss = compute()
        loss.backward()
        return loss.detach()

    return step


def oracle(inputs, beta: float) -> dict:
    """Loss and gradients in float64, a block of rows at a time (no [N, V] matrix at once)."""
    from trl.experimental.gkd import GKDTrainer

    h = inputs.hidden.detach().double().requires_grad_()
    w = inputs.weight.detach().double().requires_grad_()
    ht, wt, labels = inputs.teacher_hidden.double(), inputs.teacher_weight.double(), inputs.labels
    n = int((labels != -100).sum())
    total = 0.0
    for start in range(0, h.shape[0], ORACLE_BLOCK_ROWS):
        rows = slice(start, start + ORACLE_BLOCK_ROWS)
        block = GKDTrainer.generalized_jsd_loss((h[rows] @ w.T)[None], (ht[rows] @ wt.T)[None],
                                                labels=labels[rows][None], beta=beta, temperature=TEMPERATURE,
                                                reduction="sum") / n
        block.backward()
        total += float(block)
    return {"loss": total, "hidden": h.grad, "weight": w.grad}


def measure(name: str, shape: tuple[int, int, int], beta: float) -> dict:
    """One case in this process (see the module docstring)."""
    from bench.loss.inputs import build_inputs
    from bench.driver.probes import RssProbe

    N, D, V = shape
    result = dict(contender=name, N=N, D=D, V=V, beta=beta, temperature=TEMPERATURE, dtype="float32",
                  threads=torch.get_num_threads(), status="ok")
    inputs = build_inputs(N, D, V, device="cpu", dtype=torch.float32, teacher=True, requires_grad=True)
    step = _step(name, inputs, beta)
    t0 = time.perf_counter()
    step()  # warm-up: lazy initialisation, first allocations
    result["warmup_s"] = time.perf_counter() - t0
    inputs.zero_grads()
    with RssProbe() as probe:
        t0 = time.perf_counter()
        loss = step()
        result["time_s"] = time.perf_counter() - t0
    result["peak_rss_growth_bytes"], result["memory_method"] = probe.bytes, probe.method
    expected = oracle(inputs, beta)
    errors = {"loss": abs(float(loss) - expected["loss"]) / abs(expected["loss"])}
    for key, grad in (("hidden", inputs.hidden.grad), ("weight", inputs.weight.grad)):
        errors[key] = float((grad.double() - expected[key]).norm() / expected[key].norm())
    result["loss"], result["relative_error"] = float(loss), errors
    if errors["loss"] > TOLERANCE["loss"] or max(errors["hidden"], errors["weight"]) > TOLERANCE["grad"]:
        result["status"] = "disagrees"
    return result


def _run_case(name: str, shape, beta: float) -> dict:
    result, why = in_fresh_process("bench.loss.trl_backend", ["--case", name, "--shape", ",".join(map(str, shape)),
                                                         "--betas", str(beta)], RESULT_MARKER, CASE_TIMEOUT_S)
    if result is not None:
        return result
    return dict(contender=name, N=shape[0], D=shape[1], V=shape[2], beta=beta, status="failed", reason=why)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in load_average()) or "unknown"


def _markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"# The fused loss as TRL's distillation backend, CPU, {meta['date']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, trl {meta['trl']}, "
        f"liger-kernel {meta['liger']}  ",
        f"Load average (1, 5, 15 min) before: {meta['load_before']}; after: {meta['load_after']}  ",
        f"Objective: generalised JSD(beta) at T={TEMPERATURE} between teacher and student, no T^2, mean over the "
        "labelled tokens (weight_hard_loss=0, weight_soft_loss=1); fp32; one forward+backward after one warm-up; "
        "memory: peak RSS growth over the call in a fresh process (gradients included, inputs not).",
        "",
        "| beta | contender | time (s) | x ours | peak RSS growth (MiB) | x ours | loss rel. error | grad rel. error |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for beta in sorted({r["beta"] for r in report["results"]}):
        rows = [r for r in report["results"] if r["beta"] == beta]
        ours = next((r for r in rows if r["contender"] == "ours" and r["status"] == "ok"), None)
        for r in rows:
            if r["status"] == "failed":
                lines.append(f"| {beta} | {r['contender']} | failed: {r.get('reason')} | | | | | |")
                continue
            mib = r["peak_rss_growth_bytes"] / 2**20
            rel_t = f"{r['time_s'] / ours['time_s']:.2f}x" if ours else "-"
            rel_m = f"{r['peak_rss_growth_bytes'] / max(ours['peak_rss_growth_bytes'], 1):.2f}x" if ours else "-"
            err = r["relative_error"]
            flag = "" if r["status"] == "ok" else " (disagrees)"
            lines.append(f"| {beta} | {r['contender']}{flag} | {r['time_s']:.2f} | {rel_t} | {mib:.0f} | {rel_m} | "
                         f"{err['loss']:.1e} | {max(err['hidden'], err['weight']):.1e} |")
    N, D, V = report["meta"]["shape"]
    lines += ["", f"Shape: N={N} tokens, D={D}, V={V}. One run per case: on a shared machine the times move by "
              "tens of percent between runs; the memory figures are stable."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="2048,512,32768", help="N,D,V")
    parser.add_argument("--betas", default="0.5,1.0", help="comma-separated JSD betas")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: measure one case in this process
    args = parser.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    betas = [float(b) for b in args.betas.split(",")]
    if args.case:
        print(RESULT_MARKER + json.dumps(measure(args.case, shape, betas[0])), flush=True)
        return

    import liger_kernel  # noqa: F401 - versions for the header
    import trl
    from importlib.metadata import version

    date = today()
    arguments = argv if argv is not None else sys.argv[1:]
    meta = dict(date=date, command=" ".join(["python -m bench.loss.trl_backend", *arguments]),
                machine=device_name("cpu"), threads=torch.get_num_threads(),
                torch=torch.__version__, trl=trl.__version__, liger=version("liger-kernel"), shape=list(shape),
                load_before=_load())
    results = []
    for beta in betas:
        for name in args.contenders.split(","):
            result = _run_case(name, shape, beta)
            results.append(result)
            shown = {k: result.get(k) for k in ("contender", "beta", "status", "time_s", "peak_rss_growth_bytes")}
            print(shown, flush=True)
    meta["load_after"] = _load()
    report = {"meta": meta, "results": results}
    json_path = results_path(args.out, f"trl-backend-cpu-{date}")  # a second run that day: -2, -3...
    json_path.write_text(json.dumps(report, indent=1))
    json_path.with_suffix(".md").write_text(_markdown(report))
    print(f"wrote {json_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
