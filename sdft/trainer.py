"""``SDFTTrainer``: the HF Trainer with the SDFT loss; only ``compute_loss`` changes."""

from __future__ import annotations

from typing import Optional

import torch
from transformers import Trainer

from .integration import SDFTModel, causal_lm_loss
from .loss import SDFTLoss
from .teacher import TeacherSource


class SDFTTrainer(Trainer):
    """``Trainer`` whose loss is the fused SDFT objective against ``teacher``.

    An existing Trainer script becomes SDFT by changing the class and passing a teacher::

        trainer = SDFTTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                              teacher=FrozenCopy(model), sdft_loss=SDFTLoss(kl_weight=1.0))

    ``num_items_in_batch`` (the labelled-token count of the whole accumulated batch, which the
    Trainer computes) normalises the mean, so gradient accumulation matches one large batch.
    ``model`` may also be an :class:`SDFTModel` (then ``teacher``/``sdft_loss`` come from it);
    that form runs the step through the model's ``forward``, which multi-process wrappers need.
    """

    def __init__(self, *args, teacher: Optional[TeacherSource] = None, sdft_loss: Optional[SDFTLoss] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.sdft_loss = SDFTLoss() if sdft_loss is None else sdft_loss
        # Makes the Trainer count num_items_in_batch and not divide the loss by the number of
        # accumulation steps itself: our loss is already normalised by the whole batch's count.
        self.model_accepts_loss_kwargs = True
        self._last_components: dict[str, float] = {}
        self._tokens_seen = 0  # a tensor after the first step: summed without a host sync

    @property
    def tokens_seen(self) -> int:
        """Non-pad input tokens of this process so far."""
        return int(self._tokens_seen)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        self._tokens_seen = self._tokens_seen + (mask.sum() if mask is not None else inputs["input_ids"].numel())
        inner = self.accelerator.unwrap_model(model)
        if isinstance(inner, SDFTModel):
            out = model(num_items_in_batch=num_items_in_batch, **inputs)
        elif _is_distributed_wrapper(model):
            # Calling the unwrapped student would bypass the wrapper's forward, which DDP/FSDP
            # need to synchronise gradients (and FSDP to gather parameters).
            raise RuntimeError(
                f"SDFTTrainer under {type(model).__name__}: pass model=SDFTModel(student, teacher, loss) so that "
                "the whole loss runs inside the wrapper's forward (sdft train does this)"
            )
        else:
            out = causal_lm_loss(inner, inputs, self.teacher, self.sdft_loss, num_items_in_batch)
        loss = out.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens, and DDP averages gradients.
            loss = loss * self.accelerator.num_processes
        self._last_components = {"ce": out.ce, "kl": out.kl}
        return (loss, out) if return_outputs else loss

    def _save(self, output_dir=None, state_dict=None):
        # An SDFTModel is saved as its state dict; safetensors refuses tensors that share memory
        # (tied embeddings), so keep one name per tensor: the tie restores the other on load.
        if state_dict is None and isinstance(self.accelerator.unwrap_model(self.model), SDFTModel):
            state_dict = _one_name_per_tensor(self.model.state_dict())
        super()._save(output_dir, state_dict)

    def log(self, logs: dict, *args, **kwargs) -> None:
        # ce and kl of the last micro-batch, as detached tensors until now: no sync per step.
        if "loss" in logs and self._last_components:
            for name, value in self._last_components.items():
                logs[name] = round(float(value), 6) if torch.is_tensor(value) else value
        super().log(logs, *args, **kwargs)


def _is_distributed_wrapper(model) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel) or "FullyShardedDataParallel" in type(model).__name__


def _one_name_per_tensor(state_dict: dict) -> dict:
    seen, kept = set(), {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            kept[name] = tensor
    return kept
