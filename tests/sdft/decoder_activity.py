"""What a model's decoder computed, seen from forward hooks: for tests of the precision it ran in."""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from sdft.model_head import decoder_of

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DecoderActivity:
    """Hooks on ``model``'s decoder: the dtypes of what its linear layers returned and the
    ``[B, T, D]`` states it returned, per call, kept apart for calls with gradients (a student's
    training forward) and without (a teacher, the one-off head check)."""

    def __init__(self, model: nn.Module):
        self.dtypes: dict[bool, set] = {True: set(), False: set()}
        self.states: dict[bool, list] = {True: [], False: []}
        decoder = decoder_of(model)
        self.handles = [decoder.register_forward_hook(self._decoder)]
        self.handles += [module.register_forward_hook(self._linear) for module in decoder.modules()
                         if isinstance(module, nn.Linear)]

    def _linear(self, module, args, output):
        self.dtypes[torch.is_grad_enabled()].add(output.dtype)

    def _decoder(self, module, args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        self.states[torch.is_grad_enabled()].append(hidden.detach().clone())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class WatchDecoder(TrainerCallback):
    """A :class:`DecoderActivity` on the trainer's model from the start of training (after the
    trainer built it, and after a teacher was copied from it)."""

    activity: DecoderActivity

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.activity = DecoderActivity(model)
