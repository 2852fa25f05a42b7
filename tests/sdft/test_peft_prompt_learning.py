"""PEFT prompt learning: prefix tuning trains the PEFT model's own objective (its virtual tokens
reach student and teacher, and the prompt encoder gets its gradient); the kinds that prepend
virtual tokens to the sequence are refused up front, never trained silently."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import TrainingArguments

peft = pytest.importorskip("peft")

from sdft import SDFTLoss, SDFTTrainer, causal_lm_loss  # noqa: E402
from sdft.architectures import UnsupportedModel  # noqa: E402
from sdft.teacher import AdapterDisabled, FrozenCopy  # noqa: E402
from tests.sdft.tiny_models import make_batch, tiny_model  # noqa: E402


def _prefix_tuned(seed: int = 0):
    torch.manual_seed(seed)
    return peft.get_peft_model(tiny_model("llama", dtype=torch.float64),
                               peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))


def _own_objective(student, teacher_logits, batch, kl_weight, tau):
    """CE + kl_weight * tau^2 * KL(teacher || student) from the student's own logits (its PEFT
    forward) in float64, over the shifted labels that are not -100."""
    z_s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    z_s, z_t = z_s[:, :-1], teacher_logits[:, :-1]
    targets = batch["labels"][:, 1:]
    counted = targets != -100
    ce = F.cross_entropy(z_s.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
    kl = (F.softmax(z_t / tau, -1) * (F.log_softmax(z_t / tau, -1) - F.log_softmax(z_s / tau, -1))).sum(-1)
    return (ce + kl_weight * tau**2 * (kl * counted).sum()) / counted.sum()


@pytest.mark.parametrize("teacher_kind", ["AdapterDisabled", "FrozenCopy"])
def test_prefix_tuning_trains_the_peft_models_own_objective(teacher_kind):
    """Loss and prompt-encoder gradient equal the objective computed from the PEFT model's own
    logits. AdapterDisabled: the teacher is the base model without the prefix. FrozenCopy: a
    snapshot keeps its own prefix (the student's prefix is moved after the snapshot)."""
    student = _prefix_tuned()
    batch = make_batch()
    if teacher_kind == "AdapterDisabled":
        teacher = AdapterDisabled(student)
        with torch.no_grad():
            teacher_logits = student.get_base_model()(input_ids=batch["input_ids"],
                                                      attention_mask=batch["attention_mask"]).logits
    else:
        teacher = FrozenCopy(student)
        with torch.no_grad():
            student.prompt_encoder["default"].embedding.weight.mul_(1.5)
            teacher_logits = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           use_cache=False).logits
    loss = SDFTLoss(kl_weight=0.7, temperature=0.5)
    prompt = student.prompt_encoder["default"].embedding.weight

    out = causal_lm_loss(student, batch, teacher, loss)
    out.loss.backward()
    ours = prompt.grad.clone()
    prompt.grad = None
    expected = _own_objective(student, teacher_logits, batch, 0.7, 0.5)
    expected.backward()

    assert float(out.kl) > 1e-3  # the prefix moves the student away from its teacher
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=0)
    assert float(prompt.grad.norm()) > 0
    torch.testing.assert_close(ours, prompt.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("config", [
    peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
], ids=["PROMPT_TUNING", "P_TUNING"])
def test_prompt_learning_that_prepends_tokens_is_refused_up_front(tmp_path, config):
    """Prompt tuning and P-tuning prepend virtual tokens to the sequence: refused naming the PEFT
    type, with the head check off too (it would otherwise train without the virtual tokens, the
    prompt encoder never moving), and when a trainer is built."""
    student = peft.get_peft_model(tiny_model("llama"), copy.deepcopy(config))
    name = config.peft_type.value
    with pytest.raises(UnsupportedModel, match=f"PEFT adapter {name}: .*Use prefix tuning"):
        causal_lm_loss(student, make_batch(), check_head=False)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    with pytest.raises(UnsupportedModel, match=f"PEFT adapter {name}"):
        SDFTTrainer(model=student, args=args, train_dataset=Dataset.from_list([{"input_ids": [3, 4, 5]}]))
