"""Every causal-LM class in transformers' auto mapping, built tiny: the fused loss against the
model's own ``model(..., labels=...).loss``.

For each ``model_type`` in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` the outcome is one of

- ``matched``: :func:`sdft.causal_lm_loss` (no teacher, the head check on) gives the model's own
  loss and gradients within ``RTOL`` in float64;
- ``refused``: it raises one of our errors (``UnsupportedModel``, ``UnsupportedLossTerm``,
  ``ModelHeadMismatch``), whose message names the class;
- ``skipped``: the class cannot be tried here (it does not build tiny from its config, needs
  an extra package, or its own forward fails on the tiny model), with the reason;
- ``mismatch`` or ``unclear error``: a silent objective change or an error that is not ours,
  which the test suite reports as failures.

``python -m tests.sdft.causal_lm_sweep [model_type ...]`` prints the outcomes as a table;
``--doc`` prints docs/architectures.md.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass

import torch
import transformers as tf
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from sdft import causal_lm_loss
from sdft.architectures import UnsupportedLossTerm, UnsupportedModel
from sdft.head_check import ModelHeadMismatch
from tests.sdft.tiny_models import make_batch, tiny_config

# Loss: relative. Gradients: each parameter's error relative to the norm of the whole gradient.
# The model's own loss upcasts (here: rounds) its logits to float32, so its gradients carry
# float32 noise of ~1e-7 of their norm; a parameter whose own gradient is nearly zero (a
# router under top-1 routing) would show that noise as a large error relative to itself.
RTOL = 1e-6
MAX_PARAMETERS = 3_000_000
OUR_ERRORS = (UnsupportedModel, UnsupportedLossTerm, ModelHeadMismatch)
MODEL_TYPES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@dataclass
class Outcome:
    model_type: str
    class_name: str
    kind: str  # matched | refused | skipped | mismatch | unclear error
    detail: str = ""
    seconds: float = 0.0


class CannotTry(Exception):
    """The class cannot be tried here; the message says why."""


def build_tiny(model_type: str, seed: int = 0) -> torch.nn.Module:
    """The model_type's causal-LM class, tiny, float64, every parameter perturbed a little (so
    that a per-token scale or a bias initialised to a constant still shows when missed)."""
    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    try:
        model_class = getattr(tf, class_name)
        config = tiny_config(model_type)
        with torch.device("meta"):
            n_parameters = sum(p.numel() for p in model_class(config).parameters())
    except Exception as e:  # noqa: BLE001 - any failure to build is a reason to skip, reported as such
        raise CannotTry(f"does not build tiny: {type(e).__name__}: {_first_line(e)}") from e
    if n_parameters > MAX_PARAMETERS:
        raise CannotTry(f"{n_parameters / 1e6:.0f}M parameters after the generic shrinking (a sub-model it "
                        "does not reach)")
    torch.manual_seed(seed)
    try:
        # Eager experts: the grouped matmul kernels have no float64.
        model = model_class._from_config(config, experts_implementation="eager")
    except Exception as e:  # noqa: BLE001
        raise CannotTry(f"does not build tiny: {type(e).__name__}: {_first_line(e)}") from e
    model.to(torch.float64).train()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # logits large enough to bend a softcap
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.add_(0.1 * max(float(p.abs().mean()), 0.02) * noise)
    return model


def sweep_one(model_type: str) -> Outcome:
    start = time.perf_counter()
    outcome = _sweep_one(model_type)
    outcome.seconds = time.perf_counter() - start
    return outcome


def _sweep_one(model_type: str) -> Outcome:
    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = build_tiny(model_type)
        except CannotTry as e:
            return Outcome(model_type, class_name, "skipped", str(e))
        batch = make_batch()
        try:  # ours first: a refusal needs no oracle
            out = causal_lm_loss(model, batch)
            out.loss.backward()
        except OUR_ERRORS as e:
            if class_name not in str(e):
                return Outcome(model_type, class_name, "unclear error", f"refusal does not name the class: {e}")
            return Outcome(model_type, class_name, "refused", f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - not ours: unclear, unless the model's own forward fails too
            ours_failed = f"{type(e).__name__}: {_first_line(e)}"
        else:
            ours_failed = None
        got = grads(model)
        model.zero_grad(set_to_none=True)
        try:
            own_loss = model(**batch, use_cache=False).loss
            own_loss.backward()
        except Exception as e:  # noqa: BLE001
            return Outcome(model_type, class_name, "skipped",
                           f"its own forward fails on the tiny model: {type(e).__name__}: {_first_line(e)}")
        if ours_failed is not None:
            return Outcome(model_type, class_name, "unclear error", ours_failed)
        expected_grads = grads(model)
    expected = float(own_loss.detach())
    loss_error = abs(float(out.loss.detach()) - expected) / abs(expected)
    worst_name, worst = worst_gradient_error(got, expected_grads)
    detail = (f"loss {float(out.loss.detach()):.6f} vs {expected:.6f} (rel {loss_error:.1e}); "
              f"worst gradient {worst_name} rel {worst:.1e}")
    if out.aux is not None:
        detail += f"; aux {float(out.aux):.4g}"
    if loss_error > RTOL or worst > RTOL:
        return Outcome(model_type, class_name, "mismatch", detail)
    return Outcome(model_type, class_name, "matched", detail)


def worst_gradient_error(got: dict, expected: dict) -> tuple[str, float]:
    """The parameter whose gradient differs most, and by how much relative to the norm of the
    whole expected gradient (see RTOL); a gradient missing on one side counts as zeros."""
    scale = max(float(torch.stack([g.norm() for g in expected.values()]).norm()), 1e-30)
    worst_name, worst = "", 0.0
    for name in expected.keys() | got.keys():
        reference = expected.get(name)
        ours = got.get(name)
        reference = torch.zeros_like(ours) if reference is None else reference
        ours = torch.zeros_like(reference) if ours is None else ours
        error = float((ours - reference).norm()) / scale
        if error > worst:
            worst_name, worst = name, error
    return worst_name, worst


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""


def main(argv: list[str]) -> None:
    """Print the outcomes: ``--doc`` as the user-facing list (docs/architectures.md), else a
    table with the numbers behind each outcome."""
    tf.logging.set_verbosity_error()
    doc = "--doc" in argv
    model_types = [a for a in argv if not a.startswith("--")] or MODEL_TYPES
    outcomes = [sweep_one(t) for t in model_types]
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.kind] = counts.get(o.kind, 0) + 1
    summary = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))
    if doc:
        print(_doc(outcomes, summary))
        return
    print("| model_type | class | outcome | detail |\n|---|---|---|---|")
    for o in outcomes:
        print(f"| {o.model_type} | {o.class_name} | {o.kind} | {o.detail.replace('|', '/')} ({o.seconds:.1f} s) |")
    print(f"\n{summary}; {sum(o.seconds for o in outcomes):.0f} s")


def _doc(outcomes: list, summary: str) -> str:
    def names(kind):
        return ", ".join(f"`{o.model_type}`" for o in outcomes if o.kind == kind)

    lines = [
        "# Causal LMs: supported, refused, not tried",
        "",
        f"Every `model_type` of transformers {tf.__version__}'s `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, built tiny "
        "from its config class, float64: `causal_lm_loss` (no teacher) against the model's own "
        "`model(..., labels=...).loss` and its gradients. Generated by "
        "`python -m tests.sdft.causal_lm_sweep --doc`; the test suite runs the same sweep "
        f"(`tests/sdft/test_architectures.py`). {summary}.",
        "",
        f"**Supported** (loss and gradients within {RTOL:g}): {names('matched')}.",
        "",
        "**Refused** (`causal_lm_loss` raises before training):",
        "",
        "| model_type | class | why |",
        "|---|---|---|",
    ]
    for o in outcomes:
        if o.kind == "refused":
            reason = o.detail.split(": ", 1)[1].replace(f"{o.class_name} ({o.model_type}) ", "").replace("|", "/")
            lines.append(f"| `{o.model_type}` | {o.class_name} | {reason} |")
    lines += ["", "**Not tried here** (the test skips them, with the reason): the class does not build tiny "
              "from its config with the generic shrinking, or its own forward fails on the tiny model. "
              "The one-time head check still guards them in use.", "",
              "| model_type | class | reason |", "|---|---|---|"]
    for o in outcomes:
        if o.kind == "skipped":
            lines.append(f"| `{o.model_type}` | {o.class_name} | {o.detail.replace('|', '/')} |")
    others = [o for o in outcomes if o.kind not in ("matched", "refused", "skipped")]
    for o in others:
        lines.append(f"\n**{o.kind}**: `{o.model_type}` {o.class_name}: {o.detail}")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
