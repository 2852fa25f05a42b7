"""TRL's ``SFTTrainer`` with the SDFT loss: :class:`SDFTSFTTrainer`.

Everything ``SFTTrainer`` does stays: its dataset formats (language modelling, prompt-completion,
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

from typing import Optional, Union

import torch
from trl import SFTTrainer

from .loss import SDFTLoss
from .teacher import TeacherSource
from .trainer import SDFTTrainer, _is_distributed_wrapper


class SDFTSFTTrainer(SDFTTrainer, SFTTrainer):
    """``trl.SFTTrainer`` whose loss is the fused SDFT objective against ``teacher``.

    Takes every argument of ``SFTTrainer`` (model or path, ``SFTConfig``, datasets, processing
    class, ``peft_config``, ...) plus:

    Args:
        teacher: a teacher source (:class:`sdft.teacher.FrozenCopy` of a snapshot, a
            :class:`~sdft.teacher.HiddenStateCache`), or a teacher-source class that is built
            from the trainer's model once ``SFTTrainer`` has prepared it: ``teacher=FrozenCopy``
            snapshots the model as training starts, ``teacher=AdapterDisabled`` with a
            ``peft_config`` is the base model with the adapters off (no second copy of the
            weights). None: plain cross-entropy (the paper's stage 1).
        sdft_loss: the loss settings (:class:`sdft.SDFTLoss`; default: the paper's lambda 1,
            tau 0.5, forward KL).
        check_head: compare the fused path with the model's own forward once
            (:func:`sdft.causal_lm_loss`).

    The Trainer's ``num_items_in_batch`` is the count the fused loss uses
    (:func:`sdft.trainer.count_loss_targets`), so gradient accumulation equals one large batch.
    Logged beside ``loss``: ``ce`` and ``kl`` of the last micro-batch and ``num_tokens``;
    ``SFTTrainer``'s ``entropy`` and ``mean_token_accuracy`` need the logits and are not
    computed. Evaluation reports the same loss; ``compute_metrics`` gets logits from an extra
    forward, as in ``SFTTrainer``. One process per model: under DDP/FSDP use
    :class:`sdft.SDFTTrainer` with ``model=SDFTModel(...)``.

    The paper's recipe (stage 1: cross-entropy on the rows the model already knows; snapshot;
    stage 2: SDFT on all rows against the snapshot)::

        stage1 = SDFTSFTTrainer(model=model, args=args1, train_dataset=known, processing_class=tok)
        stage1.train()
        stage2 = SDFTSFTTrainer(model=stage1.model, args=args2, train_dataset=everything,
                                processing_class=tok, teacher=FrozenCopy)
        stage2.train()

    With LoRA, merge the stage-1 adapters (``stage1.model.merge_and_unload()``) and pass
    ``peft_config`` and ``teacher=AdapterDisabled`` to stage 2: the teacher is then the stage-1
    model, held once.
    """

    def __init__(self, *args, teacher: Union[None, TeacherSource, type] = None,
                 sdft_loss: Optional[SDFTLoss] = None, check_head: bool = True, **kwargs):
        sft_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        _refuse_other_losses(sft_args, kwargs.get("compute_loss_func"))
        build_teacher = isinstance(teacher, type)
        super().__init__(*args, teacher=None if build_teacher else teacher, sdft_loss=sdft_loss,
                         check_head=check_head, **kwargs)
        if build_teacher:  # from the model as SFTTrainer left it: loaded, PEFT-wrapped, on its device
            self.teacher = teacher(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if _is_distributed_wrapper(model):
            # The loss runs the student's decoder directly, which a DDP/FSDP wrapper would not see.
            raise RuntimeError(
                f"SDFTSFTTrainer under {type(model).__name__}: it trains in one process; for several processes use "
                "sdft.SDFTTrainer(model=SDFTModel(student, teacher, loss), ...), whose loss runs inside the "
                "wrapper's forward")
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs).detach()
            if prediction_loss_only:
                return loss, None, None
            # compute_metrics wants logits, which the fused loss never forms: one extra forward.
            logits = model(**{key: value for key, value in inputs.items() if key != "labels"}).logits
        return loss, logits, inputs.get("labels")

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self.model.training:
            # SFTTrainer's token counter, from the count the SDFT step keeps without a host sync.
            self._metrics["train"]["num_tokens"] = [self.tokens_seen]
        super().log(logs, *args, **kwargs)


def _refuse_other_losses(args, compute_loss_func) -> None:
    """SFTTrainer settings that choose another loss than the one this trainer computes."""
    if compute_loss_func is not None:
        raise ValueError("SDFTSFTTrainer computes the SDFT loss itself: compute_loss_func would be ignored")
    if args is None:
        return
    if getattr(args, "loss_type", "nll") != "nll":
        raise ValueError(f"SDFTSFTTrainer computes cross-entropy plus the teacher divergence; loss_type="
                         f"{args.loss_type!r} is another objective (use loss_type='nll')")
    if getattr(args, "label_smoothing_factor", 0.0) > 0:
        raise ValueError(f"label_smoothing_factor={args.label_smoothing_factor}: the SDFT loss has no label "
                         "smoothing (the teacher divergence is its regulariser); set it to 0")
