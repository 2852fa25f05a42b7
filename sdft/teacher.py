"""Teacher sources: each gives teacher final hidden states and head for a batch, under no_grad.

- ``FrozenCopy``: a frozen deep copy of the model at a chosen moment (the paper's snapshot after
  the task-format stage), optionally in a cheaper dtype.
- ``AdapterDisabled``: for LoRA/PEFT students, the base model with adapters switched off: no
  extra weights at all.
- ``HiddenStateCache`` (:mod:`sdft.hidden_state_cache`, importable from here too): the
  teacher's hidden states computed once over a dataset and stored in a memory-mapped file;
  training then needs no teacher forward and no teacher weights but the head.

What every source returns and the protocol they follow: :mod:`sdft.teacher_output`.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from .hidden_state_cache import HiddenStateCache, final_hidden_width, model_fingerprint, token_fingerprint
from .model_head import HeadSpec, final_hidden_states, head_spec
from .packing import sequence_kwargs
from .sharding import run_inside
from .teacher_output import TeacherOutput, TeacherSource, eval_mode, frozen_head

__all__ = ["AdapterDisabled", "FrozenCopy", "HiddenStateCache", "TeacherOutput", "TeacherSource",
           "final_hidden_width", "model_fingerprint", "token_fingerprint"]


class FrozenCopy:
    """A frozen snapshot: ``FrozenCopy(model)`` deep-copies ``model`` as it is now.

    Args:
        model: the transformers causal LM to snapshot.
        dtype: optional dtype for the copy (e.g. ``torch.bfloat16`` for an fp32 student): half
            the memory, at the cost of teacher logits rounded at that precision.

    Under a wrapper that shards the student, shard the copy too, or every process holds all of
    it: :func:`sdft.sharding.fully_shard_teacher` (FSDP2) or
    :func:`sdft.sharding.deepspeed_teacher` (ZeRO-3) set ``wrapper``, the module whose forward
    gathers the copy's weights (its passes then run inside it), and ``head``, its LM head
    gathered once (None: read from ``model`` at each call).
    """

    def __init__(self, model: nn.Module, dtype: Optional[torch.dtype] = None):
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.model.eval()
        if dtype is not None:
            self.model.to(dtype)
        self.wrapper: Optional[nn.Module] = None
        self.head: Optional[HeadSpec] = None

    def to(self, *args, **kwargs) -> "FrozenCopy":
        if self.wrapper is not None:
            raise ValueError("a sharded FrozenCopy stays where its wrapper put it")
        self.model.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Tensor]) -> TeacherOutput:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
                  **sequence_kwargs(batch)}
        if self.wrapper is None:
            hidden = final_hidden_states(self.model, **inputs)
        else:
            hidden = run_inside(self.wrapper, partial(final_hidden_states, self.model), **inputs)
        return TeacherOutput(hidden, self.head if self.head is not None else frozen_head(head_spec(self.model)))


class AdapterDisabled:
    """The base model of a PEFT student, adapters off: a teacher that costs no extra weights.

    The teacher is the model the adapters were added to; as the adapters train, the student
    drifts from it while the teacher stays put.
    """

    def __init__(self, peft_model: nn.Module):
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError(f"AdapterDisabled needs a peft model with disable_adapter(), got {type(peft_model).__name__}")
        self.peft_model = peft_model

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Tensor]) -> TeacherOutput:
        base = self.peft_model.get_base_model()
        with self.peft_model.disable_adapter(), eval_mode(self.peft_model):
            hidden = final_hidden_states(base, batch["input_ids"], batch.get("attention_mask"),
                                         **sequence_kwargs(batch))
            head = head_spec(base)
        return TeacherOutput(hidden, frozen_head(head))
