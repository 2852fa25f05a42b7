"""``SDFTTrainer``: the HF Trainer with the SDFT loss, and :func:`build_trainer`, the one place
where ``sdft train`` and the demo put a student, its teacher, the loss and an optimizer together.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments

from sdft_kernels import release_workspace

from .architectures import check_supported
from .freezing import FreezeReport, masked_optimizer
from .integration import SDFTModel, causal_lm_loss, decoder_inputs, shifted_targets
from .loss import SDFTLoss
from .param_groups import decays, param_groups, param_groups_by_name  # noqa: F401 (param_groups: re-exported)
from .sharding import deepspeed_teacher, fully_shard_teacher, wrapper_kind
from .teacher import FrozenCopy, TeacherSource


class SDFTTrainer(Trainer):
    """``Trainer`` whose loss is the fused SDFT objective against ``teacher``.

    An existing Trainer script becomes SDFT by changing the class and passing a teacher::

        trainer = SDFTTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                              teacher=FrozenCopy(model), loss=SDFTLoss(kl_weight=1.0))

    ``num_items_in_batch``, the count of targets in the whole accumulated batch, normalises the
    mean, so gradient accumulation matches one large batch. The Trainer's own count is replaced
    by exactly what the loss counts (:func:`count_loss_targets`: labels shifted, padding
    masked, the loss's ``ignore_index``), whether the model is the plain student or an
    :class:`SDFTModel`, which the Trainer would not recognise as a causal LM. ``model`` may be
    an :class:`SDFTModel` (then ``teacher``/``loss`` come from it); that form runs the step
    through the model's ``forward``. A plain student under DDP, FSDP or DeepSpeed runs the loss
    inside the wrapper's forward (:func:`causal_lm_loss`'s ``wrapper``). With ``bf16=True`` /
    ``fp16=True`` the loss, the student's and the teacher's decoders included, runs under the
    Trainer's autocast.

    Under FSDP (``fsdp=`` / ``fsdp_config=``, or an accelerate config) or DeepSpeed ZeRO-3, a
    :class:`~sdft.teacher.FrozenCopy` teacher is sharded as the student is when the trainer is
    built (:func:`sdft.sharding.fully_shard_teacher`; ZeRO-3: an inference engine of its own,
    :func:`sdft.sharding.deepspeed_teacher`); otherwise it is moved to the training device.
    ``optimizer_factory``: builds the optimizer from the model as the Trainer holds it when it
    creates its optimizer (after FSDP has wrapped it), in place of the Trainer's default; it is
    how :func:`build_trainer` gives its optimizer under FSDP, where the Trainer takes none.
    ``sdft_loss=``, the former name of ``loss=``, is still accepted, with a ``FutureWarning``.
    """

    def __init__(self, *args, teacher: Optional[TeacherSource] = None, loss: Optional[SDFTLoss] = None,
                 check_head: bool = True,
                 optimizer_factory: Optional[Callable[[nn.Module], torch.optim.Optimizer]] = None, **kwargs):
        loss = renamed_keyword(kwargs, "sdft_loss", "loss", loss, type(self).__name__)
        super().__init__(*args, **kwargs)
        self._optimizer_factory = optimizer_factory
        self.check_head = check_head  # for a plain student; an SDFTModel carries its own (causal_lm_loss)
        inner = self.accelerator.unwrap_model(self.model)
        if isinstance(inner, SDFTModel):
            teacher = inner.teacher if teacher is None else teacher
            loss = inner.loss if loss is None else loss
        self.teacher = teacher
        self._place_teacher()
        if isinstance(inner, SDFTModel) and self.args.label_names is None:
            # The Trainer finds the label names in the model's forward signature, and an
            # SDFTModel's takes the batch as **kwargs: without this, evaluation would compute no
            # loss (no eval_loss, nothing for load_best_model_at_end to compare).
            self.label_names = ["labels"]
        self.loss = SDFTLoss() if loss is None else loss
        # What the fused path refuses (a model it cannot reproduce, a PEFT prompt-learning kind it
        # does not support) is refused now, not at the first step.
        check_supported(inner.student if isinstance(inner, SDFTModel) else inner)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"SDFTTrainer sees {self.args.n_gpu} GPUs in one process (torch.nn.DataParallel); launch one "
                "process per GPU instead (torchrun --nproc_per_node N), which runs DDP"
            )
        # Makes the Trainer count num_items_in_batch and not divide the loss by the number of
        # accumulation steps itself: our loss is already normalised by the whole batch's count.
        self.model_accepts_loss_kwargs = True
        self._last_components: dict[str, float] = {}
        self._tokens_seen = 0  # a tensor after the first step: summed without a host sync

    @property
    def sdft_loss(self) -> SDFTLoss:
        """The former name of ``loss``, for one release."""
        warnings.warn(f"{type(self).__name__}.sdft_loss is renamed {type(self).__name__}.loss", FutureWarning,
                      stacklevel=2)
        return self.loss

    def _place_teacher(self) -> None:
        """A FrozenCopy teacher sharded as the student will be, or on the training device."""
        teacher = self.teacher
        if not isinstance(teacher, FrozenCopy) or teacher.wrapper is not None:
            return
        if self.is_deepspeed_enabled:
            config = dict(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            if int(config.get("zero_optimization", {}).get("stage", 0)) == 3:
                # bf16 / fp16 may still read "auto" here: the training arguments decide them.
                config.update(bf16={"enabled": bool(self.args.bf16)}, fp16={"enabled": bool(self.args.fp16)})
                deepspeed_teacher(teacher, config)
                return
        elif self.is_fsdp_enabled:
            fully_shard_teacher(teacher, **_fsdp2_teacher_settings(self.accelerator.state.fsdp_plugin))
            return
        teacher.to(self.args.device)

    def train(self, *args, **kwargs):
        """``Trainer.train``; when it returns (or raises), the CPU chunk buffers that the loss
        keeps between steps (about one chunk budget, :func:`sdft_kernels.release_workspace`)
        are freed for whatever the process does next, such as evaluation or generation."""
        try:
            return super().train(*args, **kwargs)
        finally:
            release_workspace()

    def create_optimizer(self, model=None):
        if self.optimizer is None and self._optimizer_factory is not None:
            self.optimizer = self._optimizer_factory(self.model if model is None else model)
            return self.optimizer
        return super().create_optimizer(model) if model is not None else super().create_optimizer()

    @property
    def tokens_seen(self) -> int:
        """Non-pad input tokens of this process so far."""
        return int(self._tokens_seen)

    def get_batch_samples(self, *args, **kwargs):
        """The Trainer's micro-batches of one optimizer step and their target count: the count
        of :func:`count_loss_targets`, summed over the micro-batches (and over processes when
        ``average_tokens_across_devices``), in place of the Trainer's own."""
        batch_samples, num_items = super().get_batch_samples(*args, **kwargs)
        if num_items is None or not batch_samples:
            return batch_samples, num_items
        device = args[2] if len(args) > 2 else kwargs.get("device", self.args.device)
        ignore = self.loss.options.ignore_index
        count = sum(count_loss_targets(batch, ignore) for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batch_samples, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            # An evaluation batch is normalised by its own target count, which the loss
            # counts itself; the Trainer's count there follows its own rule, not the loss's.
            num_items_in_batch = None
        mask = inputs.get("attention_mask")
        self._tokens_seen = self._tokens_seen + (mask.sum() if mask is not None else inputs["input_ids"].numel())
        inner = self.accelerator.unwrap_model(model)
        # Mixed precision (bf16=True / fp16=True): accelerate applies its autocast by wrapping the
        # prepared model's own forward, but the fused path calls the student's decoder (and the
        # teacher's) directly, so the wrapper never runs for them. The Trainer's
        # autocast_smart_context_manager() is a no-op in transformers 5 (it leaves autocast to
        # accelerate), so the context comes from accelerator.autocast(): built from the same
        # settings (native_amp, the autocast handler) as the wrapped forward in every accelerate
        # release this package supports, and a no-op where the wrapper applies none (fp32, fp16
        # on CPU). Nested inside the wrapped forward (an SDFTModel, a DDP-wrapped student), it
        # changes nothing.
        with self.accelerator.autocast():
            if isinstance(inner, SDFTModel):
                out = model(num_items_in_batch=num_items_in_batch, **inputs)
            else:
                # Under DDP, FSDP or DeepSpeed the loss runs inside the wrapper's forward, which
                # synchronises the gradients and gathers sharded parameters (causal_lm_loss's wrapper).
                wrapper = model if wrapper_kind(model) is not None else None
                out = causal_lm_loss(inner, inputs, self.teacher, self.loss, num_items_in_batch,
                                     check_head=self.check_head, wrapper=wrapper,
                                     aux_weight=self._aux_weight(num_items_in_batch))
        loss = out.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens, and DDP averages gradients.
            loss = loss * self.accelerator.num_processes
        # Every part is a field of the output, so it survives the rebuild of a mixed-precision
        # wrapper around an SDFTModel (accelerate's convert_outputs_to_fp32).
        self._record_components(out)
        return (loss, out) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """``(loss, logits, labels)`` of an evaluation batch: the SDFT loss of the batch, as in
        training (normalised by the batch's own target count); with ``compute_metrics``, the
        student's ``[batch, seq, V]`` logits from a forward of its own, since the fused loss
        never forms them."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs).detach()
            if prediction_loss_only:
                return loss, None, None
            inner = self.accelerator.unwrap_model(model)
            student = inner.student if isinstance(inner, SDFTModel) else model
            with self.accelerator.autocast():
                logits = student(**decoder_inputs(inputs)).logits
        return loss, logits, inputs.get("labels")

    def _aux_weight(self, num_items_in_batch) -> Optional[float]:
        """The weight of an MoE model's load-balancing loss in a micro-batch's loss. None: the
        model's own coefficient, added to each micro-batch's loss as the model's own forward
        adds it under the Trainer."""
        return None

    def _record_components(self, out) -> None:
        """Keeps what :meth:`log` reports beside the loss: ``ce`` and ``kl`` of the micro-batch, and
        ``aux``, an MoE model's weighted load-balancing term inside its loss."""
        self._last_components = {"ce": out.ce, "kl": out.kl}
        if getattr(out, "aux", None) is not None:
            self._last_components["aux"] = out.aux

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


def renamed_keyword(kwargs: dict, old: str, new: str, value: Any, owner: str) -> Any:
    """``value`` (given as ``new=``), or what ``kwargs`` holds under ``old``, the keyword's
    former name, which is removed from ``kwargs`` and warned about (``FutureWarning``): accepted
    for one release."""
    if old not in kwargs:
        return value
    given = kwargs.pop(old)
    if value is not None:
        raise TypeError(f"{owner} got both {new}= and {old}= (its former name): pass {new}= only")
    warnings.warn(f"{owner}({old}=...) is renamed {owner}({new}=...); {old}= will be removed in the next release",
                  FutureWarning, stacklevel=3)
    return given


def count_loss_targets(batch: Mapping[str, Tensor], ignore_index: int = -100) -> Tensor:
    """How many targets :func:`sdft.causal_lm_loss` counts in ``batch``: the next-token labels
    (``labels[:, 1:]``, or the inputs), padding masked, ``ignore_index`` left out. A 0-dim
    int64 tensor on the batch's device (no host sync)."""
    labels, _ = shifted_targets(batch, ignore_index)
    return (labels != ignore_index).sum()


def build_trainer(
    student: nn.Module,
    args: TrainingArguments,
    train_dataset,
    data_collator,
    *,
    teacher: Optional[TeacherSource] = None,
    loss: Optional[SDFTLoss] = None,
    freeze_report: Optional[FreezeReport] = None,
    callbacks: Sequence = (),
    check_head: bool = True,
) -> SDFTTrainer:
    """An :class:`SDFTTrainer` over ``SDFTModel(student, teacher, loss)``: how ``sdft train``
    and the demo train.

    The optimizer is AdamW with ``args``' learning rate, betas, epsilon and weight decay (so a
    training argument cannot miss the optimizer), in the groups of :mod:`sdft.param_groups`:
    matrices and embeddings decay, 1-D tensors (biases, norm scales) do not, and only
    parameters with ``requires_grad`` get state. It is
    built when the Trainer creates its optimizer (``trainer.create_optimizer()``), from the
    model as the Trainer then holds it: under FSDP, the sharded parameters. With a
    ``freeze_report`` holding partial masks, the frozen entries stay bit-identical under
    AdamW's decay and momentum (:func:`sdft.freezing.masked_optimizer`); such masks need whole
    parameters and are refused under FSDP and DeepSpeed (freeze whole tensors there: a
    group spec such as ``"ffn"`` or ``"layers[:4]"``). The Trainer builds the learning-rate
    schedule from ``args``. ``check_head``: compare the fused path with the model's own
    forward once (:func:`sdft.causal_lm_loss`).
    """
    # Which tensors decay, by their names in the student: under FSDP1 and ZeRO-3 the wrapped
    # parameters no longer have their shapes.
    decay_by_name = {name: decays(getattr(p, "ds_shape", p.shape)) for name, p in student.named_parameters()}

    def optimizer_factory(model: nn.Module) -> torch.optim.Optimizer:
        optimizer = torch.optim.AdamW(param_groups_by_name(model, decay_by_name, args.weight_decay),
                                      lr=args.learning_rate,
                                      betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        return masked_optimizer(optimizer, freeze_report) if freeze_report is not None else optimizer

    trainer = SDFTTrainer(model=SDFTModel(student, teacher, loss, check_head=check_head), args=args,
                          train_dataset=train_dataset, data_collator=data_collator,
                          optimizer_factory=optimizer_factory)
    if freeze_report is not None and freeze_report.partial and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        raise ValueError(
            f"partial freezing masks ({', '.join(e.name for e in freeze_report.partial)}) keep entries of a parameter "
            f"fixed by index into the whole tensor; under {'FSDP' if trainer.is_fsdp_enabled else 'DeepSpeed'} each "
            "process holds a shard of it. Freeze whole tensors instead (a group such as 'ffn' or 'layers[:4]'), "
            "or train without sharding (DDP)")
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


def _fsdp2_teacher_settings(plugin) -> dict:
    """``fully_shard`` settings for the teacher from accelerate's FSDP plugin: its CPU offload
    and its mixed precision's parameter dtype."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    settings = {}
    offload = getattr(plugin, "cpu_offload", None)
    if isinstance(offload, CPUOffloadPolicy) or getattr(offload, "offload_params", False):
        settings["offload_policy"] = CPUOffloadPolicy()
    dtype = getattr(getattr(plugin, "mixed_precision_policy", None), "param_dtype", None)
    if isinstance(dtype, torch.dtype):
        settings["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype)
    return settings


def _one_name_per_tensor(state_dict: dict) -> dict:
    seen, kept = set(), {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            kept[name] = tensor
    return kept
