"""TRL's trainers with this package's fused loss.

- :class:`SDFTSFTTrainer`: TRL's ``SFTTrainer`` with the SDFT loss.
- :class:`FusedJSDDistillationTrainer`: TRL's ``DistillationTrainer`` (generalised JSD, on-policy)
  with its full-vocabulary divergence computed by a loss with Liger's ``LigerFusedLinearJSDLoss``
  signature: :class:`sdft.fused_linear_jsd.FusedLinearJSDLoss` by default, or Liger's own.

With ``SDFTSFTTrainer`` everything ``SFTTrainer`` does stays: its dataset formats (language modelling, prompt-completion,
conversational), ``completion_only_loss`` and ``assistant_only_loss`` (they become the labels'
-100s), ``packing`` / ``padding_free`` (the ``position_ids`` reach student and teacher, and no
target crosses a document boundary, :mod:`sdft.packing`), ``peft_config``, gradient accumulation
and the rest of its arguments. Only the loss changes: cross-entropy plus
``kl_weight * tau**2 * KL(teacher || student)`` from the final hidden states and the LM head,
never materialising the logits (:func:`sdft.causal_lm_loss`).

This module imports ``trl`` (``pip install sdft-kernels[trl]``); ``import sdft`` does not, and
``sdft.SDFTSFTTrainer`` loads it when first asked for.

Not to be confused with TRL's ``trl.experimental.sdft.SDFTTrainer``: that is the on-policy
self-distillation of Shenfeld et al. (the student generates, the teacher is the same model
shown a demonstration), a different method with the same acronym. The SDFT here is
arXiv 2604.15574: supervised fine-tuning on new facts, regularised towards a frozen snapshot.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
from torch import nn
from trl import DistillationTrainer, SFTTrainer

from .architectures import pre_head
from .fused_linear_jsd import FusedLinearJSDLoss
from .loss import SDFTLoss
from .model_head import head_spec
from .sharding import check_whole
from .teacher import TeacherSource
from .trainer import SDFTTrainer, renamed_keyword


class SDFTSFTTrainer(SDFTTrainer, SFTTrainer):
    """``trl.SFTTrainer`` whose loss is the fused SDFT objective against ``teacher``.

    Takes every argument of ``SFTTrainer`` (model or path, ``SFTConfig``, datasets, processing
    class, ``peft_config``, ...) plus:

    Args:
        teacher: a teacher source (:class:`sdft.teacher.FrozenCopy` of a snapshot, a
            :class:`~sdft.teacher.HiddenStateCache`), or a teacher-source class that is built
            from the trainer's model once ``SFTTrainer`` has prepared it (loaded, PEFT-wrapped,
            on its device): ``teacher=FrozenCopy`` snapshots it as it is then,
            ``teacher=AdapterDisabled`` with a ``peft_config`` is the base model with the
            adapters off (no second copy of the weights). A cache for TRL's batches is keyed
            by token content: ``trainer.teacher = HiddenStateCache.build(teacher_model,
            trainer.train_dataset, path, id_field=None)``. None: plain cross-entropy (the
            paper's stage 1).
        loss: the loss settings (:class:`sdft.SDFTLoss`; default: the paper's lambda 1,
            tau 0.5, forward KL). ``SFTConfig(loss_type="dft")`` switches its cross-entropy to
            dynamic fine-tuning (each token's cross-entropy weighted by its detached
            probability, as ``SFTTrainer`` computes it; the divergence is unchanged).
            ``sdft_loss=``, its former name, is still accepted, with a ``FutureWarning``.
        check_head: compare the fused path with the model's own forward once
            (:func:`sdft.causal_lm_loss`).

    The Trainer's ``num_items_in_batch`` is the count the fused loss uses
    (:func:`sdft.trainer.count_loss_targets`), so gradient accumulation equals one large batch.
    Logged beside ``loss``: ``ce`` and ``kl`` of the last micro-batch, ``num_tokens``,
    ``SFTTrainer``'s ``entropy`` and ``mean_token_accuracy`` (train and ``eval_``, so
    ``metric_for_best_model="eval_mean_token_accuracy"`` works), with its definitions: the
    student's entropy at temperature 1 and whether the label is its top prediction, averaged
    over the labelled positions of each micro-batch, computed by the fused loss in its own pass
    over the logits without a host sync per step; for an MoE model, SFTTrainer's ``aux_loss``
    (the unweighted load-balancing loss, averaged since the last log), whose term enters the
    loss as in ``SFTTrainer`` (``router_aux_loss_coef`` times it, averaged over the accumulated
    micro-batches). Evaluation reports the same loss; ``compute_metrics`` gets logits from an
    extra forward, as in ``SFTTrainer``. Under DDP, FSDP or DeepSpeed (``torchrun``,
    ``accelerate launch``) the loss runs inside the wrapper's forward, which synchronises the
    gradients and gathers sharded parameters, and a ``FrozenCopy`` teacher is sharded as the
    student (:class:`sdft.SDFTTrainer`).

    The paper's recipe (stage 1: cross-entropy on the rows the model already knows; snapshot;
    stage 2: SDFT on all rows against the snapshot)::

        stage1 = SDFTSFTTrainer(model=model, args=args1, train_dataset=known, processing_class=tok)
        stage1.train()
        stage2 = SDFTSFTTrainer(model=stage1.model, args=args2, train_dataset=everything,
                                processing_class=tok, teacher=FrozenCopy)
        stage2.train()

    PEFT prompt learning: prefix tuning runs through the PEFT model's forward, so its virtual
    tokens reach student and teacher (with ``gradient_checkpointing=False``, which ``SFTTrainer``
    needs for it as well); prompt tuning and P-tuning are refused when the trainer is built.

    With LoRA, merge the stage-1 adapters (``stage1.model.merge_and_unload()``) and pass
    ``peft_config`` and ``teacher=AdapterDisabled`` to stage 2: the teacher is then the stage-1
    model, held once.
    """

    def __init__(self, *args, teacher: Union[None, TeacherSource, type] = None,
                 loss: Optional[SDFTLoss] = None, check_head: bool = True, **kwargs):
        loss = renamed_keyword(kwargs, "sdft_loss", "loss", loss, type(self).__name__)
        sft_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        _refuse_other_losses(sft_args, kwargs.get("compute_loss_func"))
        # SFTTrainer's metrics come from the loss's own pass; SFTConfig(loss_type="dft") is an
        # option of the loss too. (An SDFTModel passed as the model keeps its own loss.)
        settings = {"metrics": True}
        if getattr(sft_args, "loss_type", "nll") == "dft":
            settings["loss_type"] = "dft"
        if loss is not None or not _is_sdft_model(kwargs.get("model", args[0] if args else None)):
            loss = _with_settings(loss, **settings)
        build_teacher = isinstance(teacher, type)
        super().__init__(*args, teacher=None if build_teacher else teacher, loss=loss,
                         check_head=check_head, **kwargs)
        if build_teacher:  # from the model as SFTTrainer left it: loaded, PEFT-wrapped, on its device
            self.teacher = teacher(self.model)

    def _aux_weight(self, num_items_in_batch) -> float:
        # SFTTrainer's MoE objective: router_aux_loss_coef (its argument, else the model config's)
        # times the unweighted load-balancing loss, divided by the number of accumulated
        # micro-batches when the loss is normalised by the whole batch's count (a mean over
        # them); nothing when SFTTrainer disabled the term.
        if not self.aux_loss_enabled:
            return 0.0
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return self.router_aux_loss_coef / (steps if num_items_in_batch is not None else 1)

    def _record_components(self, out) -> None:
        self._last_components = {"ce": out.ce, "kl": out.kl}
        if getattr(out, "entropy", None) is not None:
            self._record_metrics(out)
        if self.aux_loss_enabled and getattr(out, "aux_loss", None) is not None:
            # SFTTrainer's aux_loss: the unweighted load-balancing loss, averaged over processes
            # and over the micro-batches since the last log; a tensor until log() (no host sync).
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(out.aux_loss.reshape(1)).mean())

    def _record_metrics(self, out) -> None:
        """SFTTrainer's ``entropy`` and ``mean_token_accuracy`` of this micro-batch, as it defines
        them: over the positions with a label, summed across processes; 0 without any. Kept as
        tensors (no host sync per step) until :meth:`log`."""
        mode = "train" if self.model.training else "eval"
        dtype = out.entropy.dtype
        # One collective for the three sums (the counts are exact in float32 up to 2^24 tokens).
        sums = torch.stack([out.n_tokens.detach().to(dtype), out.entropy.sum(), out.top1.sum().to(dtype)])
        count, entropy, correct = self.accelerator.gather_for_metrics(sums.reshape(1, 3)).sum(0)
        denominator = count.clamp(min=1)
        self._metrics[mode]["entropy"].append(entropy / denominator)
        self._metrics[mode]["mean_token_accuracy"].append(correct / denominator)

    def log(self, logs: dict, *args, **kwargs) -> None:
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            # SFTTrainer's token counter, from the count the SDFT step keeps without a host sync.
            self._metrics["train"]["num_tokens"] = [self.tokens_seen]
        # The metrics recorded as tensors since the last log, read back once here.
        for key, values in self._metrics[mode].items():
            tensors = [v for v in values if torch.is_tensor(v)]
            if tensors:
                floats = iter(torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist())
                self._metrics[mode][key] = [next(floats) if torch.is_tensor(v) else v for v in values]
        super().log(logs, *args, **kwargs)


def _refuse_other_losses(args, compute_loss_func) -> None:
    """SFTTrainer settings that choose another loss than the one this trainer computes."""
    if compute_loss_func is not None:
        raise ValueError("SDFTSFTTrainer computes the SDFT loss itself: compute_loss_func would be ignored")
    if args is None:
        return
    if getattr(args, "loss_type", "nll") not in ("nll", "dft"):
        raise ValueError(f"SDFTSFTTrainer computes cross-entropy (or its dynamic fine-tuning weighting) plus the "
                         f"teacher divergence; loss_type={args.loss_type!r} is another objective (use 'nll' or 'dft')")
    if getattr(args, "label_smoothing_factor", 0.0) > 0:
        raise ValueError(f"label_smoothing_factor={args.label_smoothing_factor}: the SDFT loss has no label "
                         "smoothing (the teacher divergence is its regulariser); set it to 0")


def _with_settings(loss: Optional[SDFTLoss], **settings) -> SDFTLoss:
    """``loss`` (default: the paper's) with these :class:`sdft_kernels.LossOptions` settings: the
    metrics ``SFTTrainer`` logs, ``loss_type="dft"`` as ``SFTConfig`` asks for it."""
    loss = SDFTLoss() if loss is None else loss
    if all(getattr(loss.options, name) == value for name, value in settings.items()):
        return loss
    return SDFTLoss(dataclasses.replace(loss.options, **settings), impl=loss.impl,
                    kl_positions=loss.kl_positions, chunk_size=loss.chunk_size)


def _is_sdft_model(model) -> bool:
    from .integration import SDFTModel

    return isinstance(model, SDFTModel)


# ----------------------------------------------------------------------------------------------
# TRL's DistillationTrainer with a Liger-signature fused loss
# ----------------------------------------------------------------------------------------------

# What TRL 1.16's DistillationTrainer forwards to the backbone besides ids and mask (VLM inputs).
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")


class FusedJSDDistillationTrainer(DistillationTrainer):
    """``trl.DistillationTrainer`` whose divergence is computed by ``fused_jsd_loss``.

    TRL 1.16 computes the divergence of its ``DistillationTrainer`` with its own chunked kernel
    and no longer plugs Liger's ``LigerFusedLinearJSDLoss`` into its distillation trainers
    (GKD materialises the logits; the on-policy ``SDFTTrainer`` too). This subclass is the place
    for a loss with Liger's call signature, ``loss(student_hidden, student_weight,
    teacher_hidden, teacher_weight, labels, student_bias, teacher_bias)``:

    Args:
        fused_jsd_loss: default ``FusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1,
            beta=args.beta, temperature=args.temperature)``, which is the trainer's own
            objective; or Liger's ``LigerFusedLinearJSDLoss`` with the same settings. Its
            settings rule: a ``weight_hard_loss`` > 0 adds cross-entropy on the generated tokens.
        other arguments: as ``DistillationTrainer``.

    Everything but the loss is the parent's: generation, batching, the teacher's forward, the
    DDP/FSDP routing and the normaliser (the accumulated batch's count of completion tokens).
    The student's mean entropy the parent logs comes from the loss's own pass (at temperature
    1: with another ``temperature``, whose entropy the parent logs, and with Liger's loss, it
    is NaN, which the parent's logger leaves out). Each model's logit scale and softcap (Gemma 2) apply to its own logits, as in the parent's
    divergence, so the teacher may be of another family; a softcap needs
    :class:`FusedLinearJSDLoss`, whose call takes them (Liger's takes none; a logit scale is
    folded into the hidden states for it). The loss reads the heads outside the models'
    forwards, so under FSDP or ZeRO-3, which shard them there, it is refused
    (:class:`sdft.sharding.ShardedHeadError`).
    """

    def __init__(self, *args, fused_jsd_loss: Optional[nn.Module] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_jsd_loss = fused_jsd_loss if fused_jsd_loss is not None else FusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=self.beta, temperature=self.temperature)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # The parent reaches the student's and the teacher's backbones directly (and reroutes the
        # student wrapper's forward), so accelerate's autocast, which wraps the prepared models'
        # own forward, never runs for them: under bf16=True / fp16=True both would run in
        # float32. accelerator.autocast() is that same context (see SDFTTrainer.compute_loss).
        with self.accelerator.autocast():
            return self._fused_loss(unwrapped_student, inputs, num_items_in_batch)

    def _fused_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # The batch as TRL 1.16's DistillationTrainer._compute_loss reads it: prompt + completion,
        # the loss on completion tokens (minus tool outputs, in multi-turn rollouts).
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        logits_to_keep = completion_ids.size(1)
        extra = {key: inputs[key] for key in _MULTIMODAL_KEYS if key in inputs}

        # [B, K, D] states that predict the K completion tokens, from the parent's own helper.
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep,
                                                     **extra)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                       self._get_last_hidden_state, unwrapped_teacher, input_ids,
                                                       attention_mask, logits_to_keep, **extra)
        student_head, teacher_head = head_spec(unwrapped_student), head_spec(unwrapped_teacher)
        check_whole(student_head.weight)  # this loss runs outside the student's forward: FSDP/ZeRO-3 refused
        check_whole(teacher_head.weight, "the teacher's LM head")
        # Our loss applies each model's logit scale and softcap itself, as the parent's divergence
        # does (a teacher of another family); Liger's takes neither: a scale is folded into the
        # hidden states there, a softcap refused below.
        ours = isinstance(self.fused_jsd_loss, FusedLinearJSDLoss)
        student_hidden = _head_input(unwrapped_student, student_hidden, 1.0 if ours else student_head.hidden_scale)
        teacher_hidden = _head_input(unwrapped_teacher, teacher_hidden, 1.0 if ours else teacher_head.hidden_scale)
        device = student_head.weight.device
        valid = loss_mask.to(device).reshape(-1) != 0
        ignore = getattr(self.fused_jsd_loss, "ignore_index", -100)
        labels = completion_ids.to(device).reshape(-1).masked_fill(~valid, ignore)
        args = (student_hidden.to(device), student_head.weight, teacher_hidden.to(device), teacher_head.weight, labels,
                student_head.bias, teacher_head.bias)
        n_valid = valid.sum()
        # The parent logs the student's mean entropy at its temperature; ours computes it at
        # temperature 1 in the loss's own pass, the same thing when the temperature is 1.
        # Otherwise (and with Liger's loss) NaN: what the parent's logger leaves out.
        entropy_sum = torch.full((), float("nan"), device=device)
        if ours:
            metrics = self.temperature == 1.0
            out = self.fused_jsd_loss.output(*args, num_items=num_items_in_batch, softcap=student_head.softcap,
                                             teacher_softcap=teacher_head.softcap,
                                             student_logit_scale=student_head.hidden_scale,
                                             teacher_logit_scale=teacher_head.hidden_scale, metrics=metrics)
            loss = out.loss
            if metrics:
                entropy_sum = out.entropy.sum()
        else:
            for whose, head in (("student", student_head), ("teacher", teacher_head)):
                if head.softcap is not None:
                    raise ValueError(f"{type(self.fused_jsd_loss).__name__} takes no logit softcap, and the {whose} "
                                     f"applies {head.softcap}: use sdft.fused_linear_jsd.FusedLinearJSDLoss")
            loss = self.fused_jsd_loss(*args)
            if isinstance(loss, tuple):
                loss = loss[0]
            if num_items_in_batch is not None:  # Liger divides by the local count: renormalise
                loss = loss * n_valid.clamp(min=1) / num_items_in_batch
        return loss, entropy_sum, n_valid


def _head_input(model, hidden: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, K, D]`` backbone states as ``[B * K, D]`` rows that the head's weight reads: after
    the class's pre-head module, if any, and with its logit scale folded in."""
    before_head = pre_head(model)
    if before_head is not None:
        hidden = before_head(hidden)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return hidden if scale == 1.0 else hidden * scale
