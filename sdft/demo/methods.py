"""The rows of the demo's table: what stage 2 trains on, with which loss, which parameters.

The paper's Table 1 (Kaplan et al., arXiv 2604.15574) compares training all parameters with
training only the attention projections or only the FFN blocks, plus a control that trains
all parameters on known facts only. Its definitions, on a Llama decoder:

=================  ============================================================================
row                what trains in stage 2
=================  ============================================================================
``sft``            every parameter, cross-entropy on known + unknown facts
``sdft``           the same plus ``lambda * tau^2 * KL(teacher || student)`` to the stage-1
                   snapshot; one row per lambda (``sdft_0.5``, ...)
``attention_only`` only the attention projections (q, k, v, o) of every layer; embeddings,
                   LM head, norms and MLP blocks frozen
``ffn_only``       only the MLP blocks (gate, up, down) of every layer; embeddings, LM head,
                   norms and attention frozen
``mlp_frozen``     everything except the MLP blocks: attention, embeddings, LM head and norms
                   still train (not a row of the paper: new facts can be written into the
                   key tokens' embeddings)
``known_only``     every parameter, cross-entropy on the known facts only (the control: how
                   much held-out accuracy moves when nothing new is learned)
=================  ============================================================================

Parameter groups are named with :func:`sdft.freezing.freeze`'s grammar, so the same rows apply
to any architecture that module resolves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

ROW_NAMES = ("sft", "sdft", "attention_only", "ffn_only", "mlp_frozen", "known_only")


@dataclass(frozen=True)
class Method:
    """One row: how stage 2 fine-tunes the stage-1 model.

    ``data``: ``"all"`` (train-known + train-unknown facts) or ``"known"`` (train-known only).
    ``kl_weight``: lambda of the SDFT loss; 0 is plain cross-entropy (no teacher).
    ``train_only`` / ``freeze``: a :func:`sdft.freezing.freeze` spec naming the only parameters
    that train, or the ones that do not; ``None`` for neither.
    """

    key: str
    label: str
    data: str = "all"
    kl_weight: float = 0.0
    train_only: Optional[str] = None
    freeze: Optional[str] = None

    @property
    def freezes(self) -> bool:
        return self.train_only is not None or self.freeze is not None


def sdft_key(kl_weight: float) -> str:
    """The row key of SDFT at ``kl_weight`` (``sdft_0.5``)."""
    return f"sdft_{kl_weight:g}"


def build_methods(rows: Sequence[str], kl_weights: Sequence[float], temperature: float) -> list[Method]:
    """The methods for ``rows`` (names from :data:`ROW_NAMES`), in that order; ``"sdft"`` becomes
    one method per ``kl_weights`` entry. Raises ``ValueError`` on an unknown row name."""
    unknown = [r for r in rows if r not in ROW_NAMES]
    if unknown:
        raise ValueError(f"unknown demo row(s) {unknown}; choose from {list(ROW_NAMES)}")
    if "sdft" in rows and not kl_weights:
        raise ValueError("the sdft row needs at least one lambda (kl_weight)")
    if any(not w > 0 for w in kl_weights):
        raise ValueError(f"every SDFT lambda must be > 0, got {list(kl_weights)}")
    methods: list[Method] = []
    for row in dict.fromkeys(rows):
        if row == "sft":
            methods.append(Method("sft", "SFT (all parameters)"))
        elif row == "sdft":
            methods.extend(Method(sdft_key(w), f"SDFT lambda {w:g} (tau {temperature:g})", kl_weight=w)
                           for w in dict.fromkeys(kl_weights))
        elif row == "attention_only":
            methods.append(Method(row, "attention only (q, k, v, o)", train_only="attention"))
        elif row == "ffn_only":
            methods.append(Method(row, "FFN only (MLP blocks)", train_only="ffn"))
        elif row == "mlp_frozen":
            methods.append(Method(row, "MLP frozen (attention, embeddings, head, norms train)", freeze="ffn"))
        elif row == "known_only":
            methods.append(Method(row, "all parameters, known-only data (control)", data="known"))
    return methods
