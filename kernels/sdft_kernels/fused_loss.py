"""The public entry point: ``fused_linear_sdft_loss``."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

import torch
from torch import Tensor

from .chunk_loop import ChunkedSDFT
from .compiled_epilogue import CompiledTorchEpilogue
from .loss_inputs import LossInputs
from .loss_output import SDFTLossOutput
from .options import DEFAULT_IMPL, TRITON_IMPLS, LossOptions, RunSettings
from .reference import gemm_inputs, reference_sdft_loss
from .torch_epilogue import TorchEpilogue
from .validation import check_inputs, check_label_range


_SETTINGS = tuple(f.name for f in dataclasses.fields(LossOptions))


def fused_linear_sdft_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    kl_mask: Optional[Tensor] = None,
    num_items: Union[None, int, float, Tensor] = None,
    options: Optional[LossOptions] = None,
    impl: str = DEFAULT_IMPL,
    chunk_size: Optional[int] = None,
    return_components: bool = False,
    **settings,
) -> Union[Tensor, SDFTLossOutput]:
    """LM-head matmul + cross-entropy + teacher divergence, without materialising the logits.

    Computes the same thing as this plain torch over full logits (``forward_kl``, no softcap)::

        z_s = student_hidden @ student_weight.T + student_bias            # [N, V]
        z_t = teacher_hidden @ teacher_weight.T + teacher_bias            # [N, V], constant
        ce  = F.cross_entropy(z_s, labels, ignore_index=ignore_index, reduction="none")
        kl  = (p_t * (log_softmax(z_t / tau) - log_softmax(z_s / tau))).sum(-1) * kl_mask
        loss = (ce_weight * ce + kl_weight * tau**2 * kl).sum() / num_items_or_label_count

    Args:
        student_hidden: ``[N, D]`` final hidden states (float16/bfloat16/float32/float64).
        student_weight: ``[V, D]`` LM head. With ``requires_grad=False`` its gradient GEMM is
            skipped. Of another dtype than ``student_hidden`` (bf16 activations, a float32
            master head), both are computed in their promoted dtype, as torch would (under
            autocast they are cast to its dtype first); gradients come back in each tensor's
            own dtype.
        labels: ``[N]`` int64; ``ignore_index`` or a token id in ``[0, V)``.
        teacher_hidden: ``[N, Dt]`` teacher final hidden states, or None for plain
            (fused linear) cross-entropy. ``Dt`` may differ from ``D``.
        teacher_weight: ``[V, Dt]`` teacher head; may be the very tensor ``student_weight``.
            The teacher is a constant: no gradient reaches ``teacher_*``.
        student_bias, teacher_bias: optional ``[V]`` biases, of any float dtype: added to the
            float32 logits (with ``logits_dtype="input"`` promoted with the head instead).
        kl_mask: ``[N]`` bool, the positions that carry the divergence; default: positions
            whose label is not ignored. Positions counted by neither term contribute nothing.
        num_items: normaliser of ``"mean"`` (e.g. the token count of a whole accumulated
            batch): a number >= 1, or 0 for an accumulated batch with nothing to count (the
            loss is then 0; refused, with ``validate_labels``, where a position has a label),
            or such a one-element tensor; default: the number of positions whose label is not
            ignored.
        options: the settings below as one :class:`LossOptions` (built once and reused, as
            :class:`sdft.SDFTLoss` does), or None to give them as keywords; not both.
        impl: ``"auto"`` (:func:`default_impl`), ``"triton_chunked"`` (CUDA; the default
            there: chunks of logits from cuBLAS GEMMs and one fused Triton epilogue), ``"triton"``
            (CUDA: fused Triton kernels that store no logits at all; less memory, twice the
            FLOPs), ``"torch"`` (chunked plain torch; the default elsewhere) or ``"reference"``
            (materialised; for checking).
        chunk_size: rows per chunk of the chunked paths (default: from a budget of ~256 MiB
            for ``"torch"``, 1 GiB of logits for ``"triton_chunked"``).
        return_components: return :class:`SDFTLossOutput` ``(loss, ce, kl, n_tokens)``;
            the parts are detached and unweighted, and computing them needs no host sync.

    Settings, as keywords or as ``options`` (:class:`LossOptions`' fields, with its defaults):
        ce_weight, kl_weight: weights of the two terms (``kl_weight`` is the paper's lambda).
        temperature: tau of the divergence; CE always uses temperature 1. The divergence term
            is scaled by ``tau**2``.
        divergence: ``"forward_kl"`` = KL(p_t || p_s) (the paper's), ``"reverse_kl"`` =
            KL(p_s || p_t), ``"jsd"`` = beta KL(p_t || m) + (1 - beta) KL(p_s || m) with
            ``m = beta p_t + (1 - beta) p_s``, beta = ``jsd_beta`` in [0, 1]; as in TRL and
            Liger, ``jsd`` at beta 0 is forward KL and at beta 1 reverse KL. Every divergence
            takes ``0 log 0 = 0``: teacher logits of -inf (masked entries) are allowed.
        ignore_index: the label of positions without supervision.
        reduction: ``"mean"`` (sum / normaliser), ``"sum"`` or ``"none"`` (``[N]`` rows).
        loss_type: ``"nll"`` (default): the cross-entropy; ``"dft"``: each position's
            cross-entropy weighted by its detached probability of the label, ``CE * exp(-CE)``
            (dynamic fine-tuning, TRL ``SFTTrainer``'s ``loss_type="dft"``). ``ce`` reports
            that weighted term.
        softcap: if set, every logit z of both models becomes ``softcap * tanh(z / softcap)``
            (Gemma 2); ``student_softcap`` / ``teacher_softcap`` set one model's each (not
            together with ``softcap``).
        student_logit_scale, teacher_logit_scale: each model's logits ``x @ W.T + b`` are
            multiplied by it before the softcap (Cohere's ``logit_scale``, Granite's
            ``1 / logits_scaling``), as TRL's ``DistillationTrainer`` applies them.
        logits_dtype: ``"float32"`` (default): every logit is the GEMM's float32 sum (float64
            for float64 inputs), never rounded to bfloat16/float16 before the softmax;
            ``"input"``: rounded to the inputs' dtype, bias included, as an ``nn.Linear`` head
            in that dtype returns them (bit-level parity with a materialised bf16/fp16 forward).
        metrics: also return (as ``SDFTLossOutput.entropy`` / ``.top1``, with
            ``return_components``) each labelled row's student entropy at temperature 1 and
            whether its label is the student's top prediction, from the same pass over the
            logits (no extra GEMM, no host sync).
        validate_labels: check the label range, a tensor ``num_items``, and that a
            ``num_items`` of 0 comes with no labelled position (one host sync for all); turn
            off to avoid the sync.

    Returns:
        The loss (float32, float64 for float64 inputs): a scalar, or ``[N]`` for
        ``reduction="none"``; or :class:`SDFTLossOutput` with ``return_components=True``.

    Under ``torch.autocast`` the inputs are cast as ``F.linear`` would cast them (floating
    tensors but float64, to the autocast dtype), so the GEMMs run in that dtype (their float32
    sums are the logits, unless ``logits_dtype="input"``);
    gradients reach the original tensors in their own dtypes. Under ``torch.no_grad()`` no
    gradient is formed. A second backward through the same loss (``retain_graph=True``) works
    for ``"triton"`` and ``"reference"``; the chunked paths hand their gradients over at the
    first one and raise a clear error on a second.
    """
    options = _options(options, settings)
    run = RunSettings(impl=impl, chunk_size=chunk_size)  # checks both
    inputs = LossInputs(student_hidden, student_weight, labels, teacher_hidden, teacher_weight,
                        student_bias=student_bias, teacher_bias=teacher_bias, kl_mask=kl_mask, num_items=num_items)
    device_type = student_hidden.device.type if isinstance(student_hidden, Tensor) else "cpu"
    autocast_dtype = _autocast_dtype(device_type)
    if autocast_dtype is not None:
        # As F.linear would under autocast: the GEMMs (and so the kernels) run in its dtype.
        inputs = _map(inputs, _FLOATING, lambda t: _autocast(t, autocast_dtype))
    check_inputs(inputs)
    if options.validate_labels:
        check_label_range(labels, student_weight.shape[0], options.ignore_index, num_items,
                          mean=options.reduction == "mean")
    run = _resolve(run, inputs.student_hidden.device)
    # Mixed dtypes (bf16 activations, a float32 head or bias) run in their promoted dtype.
    inputs = _in_gemm_dtypes(inputs, options.logits_dtype)
    if autocast_dtype is None:
        return _loss(inputs, options, run, return_components)
    # The kernels pick their own precisions; autocast must not re-cast inside them.
    with torch.autocast(device_type, enabled=False):
        return _loss(inputs, options, run, return_components)


_FLOATING = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias")


def _options(options: Optional[LossOptions], settings: dict) -> LossOptions:
    """The call's :class:`LossOptions`: ``options``, or built (and checked) from ``settings``."""
    unknown = sorted(set(settings) - set(_SETTINGS))
    if unknown:
        raise TypeError(f"fused_linear_sdft_loss got unexpected keyword arguments {unknown}; its settings are "
                        f"LossOptions' fields {list(_SETTINGS)}")
    if options is None:
        return LossOptions(**settings)
    if settings:
        raise TypeError(f"fused_linear_sdft_loss takes options or their keywords, not both (got options and "
                        f"{sorted(settings)})")
    if not isinstance(options, LossOptions):
        raise TypeError(f"options must be a LossOptions, got {type(options).__name__}")
    return options


def _map(inputs: LossInputs, names: tuple[str, ...], fn) -> LossInputs:
    """``inputs`` with ``fn`` applied to the fields ``names`` that hold a tensor."""
    return inputs._replace(**{name: fn(t) for name in names if (t := getattr(inputs, name)) is not None})


def _in_gemm_dtypes(inputs: LossInputs, logits_dtype: str) -> LossInputs:
    """Each model's (hidden, weight, bias) in the dtype of its logit GEMM (:func:`gemm_inputs`)."""
    h, W, b = gemm_inputs(inputs.student_hidden, inputs.student_weight, inputs.student_bias, logits_dtype)
    inputs = inputs._replace(student_hidden=h, student_weight=W, student_bias=b)
    if inputs.teacher_hidden is None:
        return inputs
    ht, Wt, bt = gemm_inputs(inputs.teacher_hidden, inputs.teacher_weight, inputs.teacher_bias, logits_dtype)
    return inputs._replace(teacher_hidden=ht, teacher_weight=Wt, teacher_bias=bt)


def _loss(inputs: LossInputs, options: LossOptions, run: RunSettings, return_components: bool
          ) -> Union[Tensor, SDFTLossOutput]:
    """The loss of checked inputs with a resolved ``run.impl``."""
    # The teacher is a constant for every implementation.
    inputs = _map(inputs, ("teacher_hidden", "teacher_weight", "teacher_bias"), Tensor.detach)
    if run.impl == "reference":
        i = inputs
        out = reference_sdft_loss(
            i.student_hidden, i.student_weight, i.labels, i.teacher_hidden, i.teacher_weight,
            student_bias=i.student_bias, teacher_bias=i.teacher_bias, kl_mask=i.kl_mask, num_items=i.num_items,
            options=options,
        )
        return out if return_components else out.loss

    inputs = inputs.counted(options)._replace(labels=inputs.labels.contiguous())
    if run.impl != "torch":  # Triton kernels index rows with one stride and contiguous columns
        inputs = _map(inputs, _FLOATING, Tensor.contiguous)
    function = _triton_function() if run.impl == "triton" else ChunkedSDFT
    loss, ce, kl, entropy, top1 = function.apply(options, run, *inputs)
    if not return_components:
        return loss
    if not options.metrics:
        entropy = top1 = None
    return SDFTLossOutput(loss, ce, kl, inputs.label_mask.sum(), entropy=entropy, top1=top1)


def default_impl(device: Union[str, torch.device]) -> str:
    """What ``impl="auto"`` runs on ``device``.

    CUDA: ``"triton_chunked"``, the essential GEMMs in cuBLAS plus one Triton epilogue per
    chunk of logits; ``impl="triton"`` stores no logits at all (less memory) but recomputes
    them in Triton tiles (twice the FLOPs). Elsewhere: the chunked torch path.
    """
    return "triton_chunked" if torch.device(device).type == "cuda" else "torch"


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast gives F.linear on ``device_type`` now, or None if it is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        enabled = torch.is_autocast_enabled() if device_type == "cuda" else False
    return torch.get_autocast_dtype(device_type) if enabled else None


def _autocast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t`` cast as autocast casts F.linear's inputs: floating tensors except float64."""
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def _resolve(run: RunSettings, device: torch.device) -> RunSettings:
    """``run`` for ``device``: ``impl="auto"`` resolved, the chunk loop's epilogue picked, and
    the grad mode of the call."""
    impl = _resolve_impl(run.impl, device)
    epilogue = None
    if impl == "triton_chunked":
        epilogue = _triton_epilogue()
    elif impl == "torch":  # inductor's C++ backend compiles the epilogue on CPU only
        epilogue = CompiledTorchEpilogue if device.type == "cpu" else TorchEpilogue
    return dataclasses.replace(run, impl=impl, epilogue=epilogue, grad_enabled=torch.is_grad_enabled())


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return default_impl(device)
    if impl in TRITON_IMPLS and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl={impl!r} needs CUDA tensors (got device {device}); use impl='torch' on this device, "
            "or set TRITON_INTERPRET=1 before importing triton to run the kernels in the interpreter"
        )
    return impl


def _triton_function():
    from .triton_autograd import TritonSDFT  # triton imports lazily: CPU users need not pay

    return TritonSDFT


def _triton_epilogue():
    from .triton_chunked import TritonEpilogue

    return TritonEpilogue
