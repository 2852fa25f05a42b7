"""The loss settings shared by every implementation, and where their defaults live.

One frozen dataclass travels from the public function (or :class:`sdft.SDFTLoss`, or the
``loss:`` section of ``sdft train``) to the reference, the chunk loop and the Triton
launchers, so that no layer re-spells the settings and none can disagree about a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
LOGITS_DTYPES = ("float32", "input")
LOSS_TYPES = ("nll", "dft")
IMPLS = ("auto", "triton", "triton_chunked", "torch", "reference")
DEFAULT_IMPL = "auto"
TRITON_IMPLS = ("triton", "triton_chunked")  # need CUDA (or Triton's interpreter)


class _Own:
    """The default of :meth:`LossOptions.with_heads`' arguments: the options' own setting."""

    def __repr__(self) -> str:
        return "OWN"


OWN = _Own()


def check_impl(impl: str) -> str:
    """``impl`` if it names an implementation; the one place this is checked."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def check_chunk_size(chunk_size: Optional[int]) -> Optional[int]:
    """``chunk_size`` if it is None or a positive int (rows per chunk of the chunked paths); the
    one place this is checked."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


@dataclass(frozen=True)
class RunSettings:
    """How one call runs, apart from what it computes (:class:`LossOptions`).

    ``impl``: the implementation (:func:`sdft_kernels.fused_linear_sdft_loss`); ``chunk_size``:
    rows per chunk of the chunked paths (None: from a memory budget); ``grad_enabled``: the grad
    mode at the call (an ``autograd.Function``'s forward runs with it off, so it is taken
    before); ``epilogue``: what the chunk loop runs between a chunk's logit and gradient GEMMs
    (:class:`sdft_kernels.chunk_loop.Epilogue`), set once ``impl`` is resolved for a device.
    """

    impl: str = DEFAULT_IMPL
    chunk_size: Optional[int] = None
    grad_enabled: bool = True
    epilogue: Optional[type] = None

    def __post_init__(self) -> None:
        check_impl(self.impl)
        check_chunk_size(self.chunk_size)


@dataclass(frozen=True)
class LossOptions:
    """Non-tensor settings of the SDFT objective.

    Per counted position i (label y_i, student logits z_s, teacher logits z_t)::

        loss_i = ce_weight * CE(z_s, y_i) * [y_i != ignore_index]
               + kl_weight * tau**2 * D(softmax(z_t / tau), softmax(z_s / tau)) * kl_mask_i

    where each model's logits ``x @ W.T + b`` are first multiplied by its logit scale
    (``student_logit_scale``, ``teacher_logit_scale``; Cohere, Granite, Falcon-H1) and then, if
    it has a softcap, mapped to ``c * tanh(z / c)`` (Gemma 2): ``softcap`` sets both models'
    caps, ``student_softcap`` / ``teacher_softcap`` one each (a teacher of another family), as
    TRL's ``DistillationTrainer`` applies them.
    ``validate_labels`` checks the label range (a tensor ``num_items``, and that a ``num_items``
    of 0 comes with no labelled position) before any kernel runs, at the cost of one host
    synchronisation per call.

    ``loss_type="dft"`` (dynamic fine-tuning, as TRL's ``SFTTrainer`` names it) weights each
    position's cross-entropy by its detached probability of the label,
    ``CE_i * exp(-CE_i)`` with no gradient through the weight; ``"nll"`` (default) is plain
    cross-entropy. The divergence is the same either way.

    ``metrics``: also compute, in the same pass over the logits, each labelled row's entropy of
    the student at temperature 1 and whether its label is the student's top prediction
    (:class:`sdft_kernels.SDFTLossOutput`'s ``entropy`` and ``top1``).

    ``logits_dtype`` says where the logits are rounded. ``"float32"`` (the default): each logit
    is the GEMM's float32 accumulator (float64 for float64 inputs) plus the bias, never rounded
    to a bfloat16/float16 input dtype before the softmax, as TRL's chunked losses and Cut
    Cross-Entropy keep it. ``"input"``: rounded to the inputs' dtype, bias included, as an
    ``nn.Linear`` LM head in that dtype returns them (parity with a materialised Hugging Face
    forward in bf16/fp16). The two are the same for float32 and float64 inputs.
    """

    ce_weight: float = 1.0
    kl_weight: float = 1.0
    temperature: float = 0.5
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    ignore_index: int = -100
    reduction: str = "mean"
    softcap: Optional[float] = None
    validate_labels: bool = True
    logits_dtype: str = "float32"
    student_softcap: Optional[float] = None
    teacher_softcap: Optional[float] = None
    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    loss_type: str = "nll"
    metrics: bool = False

    def __post_init__(self) -> None:
        for name in ("ce_weight", "kl_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        b = self.jsd_beta
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not (0.0 <= b <= 1.0):
            raise ValueError(f"jsd_beta must be in [0, 1], got {b!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        for name in ("softcap", "student_softcap", "teacher_softcap"):
            c = getattr(self, name)
            if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c)
                                  or c <= 0):
                raise ValueError(f"{name} must be None or a finite number > 0, got {c!r}")
        if self.softcap is not None and (self.student_softcap is not None or self.teacher_softcap is not None):
            raise ValueError(
                f"softcap={self.softcap} sets both models' softcaps; give it or student_softcap/teacher_softcap "
                f"(got {self.student_softcap}/{self.teacher_softcap}), not both")
        for name in ("student_logit_scale", "teacher_logit_scale"):
            s = getattr(self, name)
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {s!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.logits_dtype not in LOGITS_DTYPES:
            raise ValueError(f"logits_dtype must be one of {LOGITS_DTYPES}, got {self.logits_dtype!r}")
        for name in ("validate_labels", "metrics"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def student_cap(self) -> Optional[float]:
        """The student's softcap: ``student_softcap``, else ``softcap`` (None: no cap)."""
        return self.softcap if self.student_softcap is None else self.student_softcap

    @property
    def teacher_cap(self) -> Optional[float]:
        """The teacher's softcap: ``teacher_softcap``, else ``softcap`` (None: no cap)."""
        return self.softcap if self.teacher_softcap is None else self.teacher_softcap

    def with_heads(self, softcap=OWN, teacher_softcap=OWN, student_logit_scale=OWN, teacher_logit_scale=OWN,
                   ) -> "LossOptions":
        """These options for the model heads at hand: the student's head applies ``softcap``
        (None: no cap) and the teacher's ``teacher_softcap`` (by default the same as
        ``softcap``), each after its logit scale. An argument left out keeps these options'
        own setting (``teacher_softcap`` then follows ``softcap`` if that is given).

        A softcap these options set themselves says what the model applies: a head that
        applies another is refused (``ValueError``), never silently overridden. Returns
        ``self`` where nothing changes, else a copy with ``student_softcap`` /
        ``teacher_softcap`` (``softcap`` None) and the scales set.
        """
        student = self.student_cap if softcap is OWN else softcap
        if teacher_softcap is OWN:
            teacher_softcap = self.teacher_cap if softcap is OWN else softcap
        for own, head, whose in ((self.student_cap, student, "the student's head"),
                                 (self.teacher_cap, teacher_softcap, "the teacher's head")):
            if own is not None and head != own:
                raise ValueError(f"the loss is configured with softcap {own}, but {whose} applies {head}")
        s_scale = self.student_logit_scale if student_logit_scale is OWN else student_logit_scale
        t_scale = self.teacher_logit_scale if teacher_logit_scale is OWN else teacher_logit_scale
        heads = (student, teacher_softcap, s_scale, t_scale)
        if heads == (self.student_cap, self.teacher_cap, self.student_logit_scale, self.teacher_logit_scale):
            return self
        return dataclasses.replace(self, softcap=None, student_softcap=student, teacher_softcap=teacher_softcap,
                                   student_logit_scale=s_scale, teacher_logit_scale=t_scale)

    @property
    def effective_divergence(self) -> str:
        """The divergence the implementations compute.

        ``"jsd"`` at ``jsd_beta`` 0 is forward KL(p_t || p_s) and at 1 reverse KL(p_s || p_t),
        as in TRL's ``generalized_jsd_loss`` and Liger's fused JSD: the mixture itself would
        degenerate to ``m = p_s`` (resp. ``p_t``) there and give a divergence of exactly 0.
        """
        if self.divergence == "jsd" and self.jsd_beta in (0, 1):
            return "forward_kl" if self.jsd_beta == 0 else "reverse_kl"
        return self.divergence

    @property
    def jsd_log_weights(self) -> tuple[float, float]:
        return jsd_log_weights(self.jsd_beta)

    @property
    def kl_coefficient(self) -> float:
        """The factor in front of the divergence: ``kl_weight * tau**2``."""
        return self.kl_weight * self.temperature**2


def jsd_log_weights(beta: float) -> tuple[float, float]:
    """``(log beta, log(1 - beta))`` of the JSD mixture; -inf at beta = 0 resp. 1, so that
    ``logaddexp`` gives log m exactly at both ends."""
    b = float(beta)
    return (math.log(b) if b > 0.0 else -math.inf, math.log1p(-b) if b < 1.0 else -math.inf)
