"""The SDFT loss on a transformers causal LM, computed from hidden states: the LM head never runs.

``causal_lm_loss`` is the function; ``SDFTModel`` wraps student, teacher and loss into one module
whose ``forward`` returns the loss, so that DDP, FSDP, DeepSpeed or accelerate can wrap the whole
step (:mod:`sdft.sharding` says how the loss runs inside a wrapper's forward).
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

from sdft_kernels import SDFTLossOutput

from .architectures import auxiliary_loss, check_supported
from .head_check import ensure_checked
from .loss import SDFTLoss
from .model_head import decoder_forward, head_spec
from .packing import document_starts, sequence_kwargs
from .sharding import check_head_reachable, check_whole, head_owner, run_inside
from .teacher import TeacherSource


CausalLMLossOutput = SDFTLossOutput  # its former name: aux and aux_loss are fields of the one output type


def shifted_targets(batch: Mapping[str, Tensor], ignore_index: int = -100) -> tuple[Tensor, Optional[Tensor]]:
    """Next-token labels ``[B, T-1]`` and the target mask ``[B, T-1]`` (or None).

    Labels default to the input ids. A target is masked (and its label ignored, even if the
    collator left a real id there) where it is padding or where it starts a new document of a
    packed batch (``position_ids`` 0, :mod:`sdft.packing`): the last token of one document
    does not predict the first of the next. The mask is None when the batch has neither an
    ``attention_mask`` nor ``position_ids``.
    """
    input_ids = batch["input_ids"]
    labels = batch.get("labels")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but input_ids {tuple(input_ids.shape)}: labels must be aligned "
            "with input_ids (the Hugging Face convention: labels[:, t] is the token at position t, -100 where not "
            "supervised); the loss shifts them itself, so do not pass labels already shifted")
    labels = (input_ids if labels is None else labels)[:, 1:].clone()
    mask = batch.get("attention_mask")
    target_mask = None if mask is None else mask[:, 1:].bool()
    starts = document_starts(batch)
    if starts is not None:
        continues = ~starts[:, 1:]
        target_mask = continues if target_mask is None else target_mask & continues
    if target_mask is not None:
        labels.masked_fill_(~target_mask, ignore_index)
    return labels, target_mask


def causal_lm_loss(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    teacher: Optional[TeacherSource] = None,
    loss: Optional[SDFTLoss] = None,
    num_items_in_batch: Union[None, int, Tensor] = None,
    *,
    check_head: bool = True,
    wrapper: Optional[nn.Module] = None,
    aux_weight: Optional[float] = None,
) -> SDFTLossOutput:
    """SDFT loss of ``model`` on ``batch`` (``input_ids`` ``[B, T]``, optional ``attention_mask``
    and ``labels`` ``[B, T]`` aligned with the inputs, -100 on prompt tokens), against
    ``teacher`` (None: plain CE). A packed or padding-free batch carries ``position_ids``
    ``[B, T]`` restarting at 0 per document (and, for flash-attention, ``cu_seq_lens_*`` /
    ``max_length_*``): they reach the student's and the teacher's decoders, and no target
    crosses a document boundary (:mod:`sdft.packing`).

    Runs the decoder for final hidden states, shifts labels, masks padding, and calls the fused
    loss with the output embedding and the architecture's logit transforms (``sdft.architectures``).
    If the model's own forward adds an MoE load-balancing loss (``output_router_logits``), the
    same term is added here and reported as ``aux`` (weighted) and ``aux_loss`` (unweighted);
    ``aux_weight`` replaces the model's own coefficient (``router_aux_loss_coef``) if given. ``num_items_in_batch`` is the normaliser of
    the mean over a whole accumulated batch, as the HF Trainer passes it.

    The first call per model instance compares this path with the model's own forward on a
    short probe row and raises if they disagree (``sdft.head_check``); ``check_head=False``
    skips that. Returns :class:`sdft_kernels.SDFTLossOutput`: ``loss``, ``ce``, ``kl``,
    ``n_tokens``, the loss's ``entropy`` / ``top1`` when it computes metrics, and ``aux`` /
    ``aux_loss`` for an MoE model's load-balancing term (None otherwise).

    ``wrapper``: the DDP, FSDP1 (``FullyShardedDataParallel``) or DeepSpeed wrapper around
    ``model``, or ``model`` itself under FSDP2's ``fully_shard``, for a training loop that holds
    one (``causal_lm_loss(ddp.module, batch, teacher, wrapper=ddp)``). The whole loss then runs
    inside the wrapper's forward (:func:`sdft.sharding.run_inside`), where DDP synchronises the
    gradients and FSDP / ZeRO-3 have gathered the parameters; backpropagate from the returned
    loss. Without a wrapper, a head that a forward of ``model`` or of the head gathers (``model``
    itself under ``fully_shard``, the head in an FSDP unit of its own, any module under ZeRO-3)
    is handled too: the loss runs inside that forward (:func:`sdft.sharding.head_owner`); a
    head that is a shard outside any forward that gathers it (``model`` inside a sharded
    :class:`SDFTModel` but called outside its forward) is refused
    (:class:`sdft.sharding.ShardedHeadError`).

    Mixed precision: the student's and the teacher's decoders run under whatever autocast is
    active. accelerate applies its autocast by wrapping the prepared model's ``forward``, which
    this function does not call (it runs the decoder), so in a loop of your own call it inside
    ``accelerator.autocast()``; the trainers here (:class:`sdft.SDFTTrainer`, the TRL classes)
    do that themselves.
    """
    loss = SDFTLoss() if loss is None else loss
    ignore = loss.options.ignore_index
    labels, target_mask = shifted_targets(batch, ignore)  # checks the labels' shape first
    if wrapper is None:
        check_supported(model)  # what is refused is refused first, with its reason
        check_head_reachable(model)  # a shard here is not gathered by any forward we run
    if check_head:
        ensure_checked(model, batch, wrapper)
    aux_loss = auxiliary_loss(model)
    if aux_loss is not None and loss.options.reduction != "mean":
        raise ValueError(f"{type(model).__name__} adds an MoE auxiliary loss to its mean loss; "
                         f"reduction={loss.options.reduction!r} has no such term (use reduction='mean')")
    step = _LossStep(model, teacher, loss, num_items_in_batch, labels, target_mask, aux_loss, aux_weight)
    if wrapper is None:
        return step(batch)
    # The decoder's inputs pass through the wrapper (which may move or cast them); the rest of
    # the batch (labels, example ids for a cache) stays as given.
    return _as_output(run_inside(wrapper, lambda **passed: step({**batch, **passed}), **decoder_inputs(batch)))


def decoder_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """What the student's decoder reads from ``batch``: ``input_ids``, ``attention_mask`` when
    present and the packed-sequence keys (:func:`sdft.packing.sequence_kwargs`)."""
    inputs = {"input_ids": batch["input_ids"], **sequence_kwargs(batch)}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


class _LossStep:
    """The loss of one batch once the checks are done: decoder, teacher, fused loss. Runs inside
    the forward of the module that gathers the LM head when that is the head's own
    (:func:`sdft.sharding.head_owner`), so that the head is whole there and its gradient is
    reduced as for any layer."""

    def __init__(self, model, teacher, loss, num_items, labels, target_mask, aux_loss, aux_weight):
        self.model, self.teacher, self.loss, self.num_items = model, teacher, loss, num_items
        self.labels, self.target_mask, self.aux_loss, self.aux_weight = labels, target_mask, aux_loss, aux_weight

    def __call__(self, batch: Mapping[str, Tensor]) -> SDFTLossOutput:
        owner = head_owner(self.model)
        if owner is None:
            return self._loss(batch)
        return _as_output(run_inside(owner, lambda: self._loss(batch)))

    def _loss(self, batch: Mapping[str, Tensor]) -> SDFTLossOutput:
        model, loss, labels, target_mask, aux_loss = self.model, self.loss, self.labels, self.target_mask, self.aux_loss
        decoded = decoder_forward(model, batch["input_ids"], batch.get("attention_mask"),
                                  output_router_logits=aux_loss is not None, **sequence_kwargs(batch))
        hidden = decoded.hidden
        head = head_spec(model)
        check_whole(head.weight)

        kl_mask = None
        if loss.kl_positions == "all":
            kl_mask = torch.ones_like(labels, dtype=torch.bool) if target_mask is None else target_mask

        teacher_hidden = teacher_weight = teacher_bias = None
        teacher_softcap = head.softcap
        if self.teacher is not None:
            out = self.teacher(batch)
            check_whole(out.head.weight, "the teacher's LM head")
            teacher_hidden = _flatten(out.hidden, out.head.hidden_scale)
            teacher_weight, teacher_bias, teacher_softcap = out.head.weight, out.head.bias, out.head.softcap

        out = loss(
            _flatten(hidden, head.hidden_scale), head.weight, labels.reshape(-1), teacher_hidden, teacher_weight,
            student_bias=head.bias, teacher_bias=teacher_bias,
            kl_mask=None if kl_mask is None else kl_mask.reshape(-1),
            num_items=self.num_items, softcap=head.softcap, teacher_softcap=teacher_softcap,
        )
        if aux_loss is None:
            return out
        # Added per call to the (micro-)batch's loss, as the model's own forward adds it.
        balance = aux_loss.balance(decoded.router_logits, batch.get("attention_mask"))
        aux = ((aux_loss.coef if self.aux_weight is None else self.aux_weight) * balance).to(out.loss.dtype)
        return out._replace(loss=out.loss + aux, aux=aux.detach(), aux_loss=balance.detach().to(out.loss.dtype))


def _as_output(returned) -> SDFTLossOutput:
    """The output of a loss run inside a wrapper's forward, as the wrapper returns it: its
    tensors carry the hooks the backward needs (DDP, FSDP, DeepSpeed). Wrappers rebuild a
    NamedTuple field by field, so every field is there; one that returns a plain tuple gets
    its field names back."""
    return returned if isinstance(returned, SDFTLossOutput) else SDFTLossOutput(*returned)


def _flatten(hidden: Tensor, scale: float) -> Tensor:
    """``[B, T, D]`` states predicting positions 1..T-1 as ``[B * (T-1), D]``."""
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return flat if scale == 1.0 else flat * scale


class SDFTModel(nn.Module):
    """Student + teacher + loss as one module: ``forward(**batch)`` returns the loss output.

    The student is a registered submodule (so wrappers see and synchronise its parameters);
    the teacher is deliberately not, so it is neither trained, saved nor broadcast.

    The loss is this module's forward, so a wrapper around it (DDP; FSDP1 ``FULL_SHARD`` or
    FSDP2 ``fully_shard`` of the decoder layers and then of this module; a DeepSpeed engine,
    ZeRO-3 included) has gathered every parameter of its root unit, the LM head among them,
    while the loss reads them, and reduces their gradients. A head in a unit of its own is
    handled too (:func:`causal_lm_loss`). Shard the teacher as well, or each process holds all
    of it: :func:`sdft.sharding.fully_shard_teacher`, :func:`sdft.sharding.deepspeed_teacher`.
    """

    def __init__(self, student: nn.Module, teacher: Optional[TeacherSource] = None, loss: Optional[SDFTLoss] = None,
                 *, check_head: bool = True):
        super().__init__()
        self.student = student
        self.loss = SDFTLoss() if loss is None else loss
        self.check_head = check_head  # see causal_lm_loss
        self.__dict__["teacher"] = teacher  # plain attribute on purpose: not a submodule

    def forward(self, num_items_in_batch: Union[None, int, Tensor] = None, **batch: Tensor) -> SDFTLossOutput:
        return causal_lm_loss(self.student, batch, self.teacher, self.loss, num_items_in_batch,
                              check_head=self.check_head)
