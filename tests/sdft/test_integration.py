"""causal_lm_loss on real transformers architectures against the naive logits path."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sdft import SDFTLoss, SDFTModel, causal_lm_loss
from sdft.head_check import PROBE_TOKENS
from sdft.teacher import AdapterDisabled, FrozenCopy
from tests.sdft.tiny_models import CONFIGS, make_batch, perturbed_copy, tiny_model

TAU = 0.5


def naive_loss(student, teacher, batch, kl_weight=1.0, tau=TAU, kl_positions="labels"):
    """Full logits from the models' own forward, then CE + tau^2 KL(teacher || student)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    z_s = student(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    ce = F.cross_entropy(z_s.reshape(-1, z_s.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    total = ce
    if teacher is not None:
        with torch.no_grad():
            z_t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
        kl = (F.softmax(z_t / tau, -1) * (F.log_softmax(z_t / tau, -1) - F.log_softmax(z_s / tau, -1))).sum(-1)
        where = valid if kl_positions == "labels" else mask[:, 1:].bool()
        total = total + kl_weight * tau**2 * (kl * where).sum()
    return total / valid.sum()


@contextlib.contextmanager
def head_forward_forbidden(model, probe_calls: int = 0):
    """The fused path never runs the LM head on the batch. The one-time head check may run
    the model's own forward ``probe_calls`` times, on one row of at most PROBE_TOKENS tokens."""
    calls = []

    def guard(_, args):
        positions = args[0].shape[:-1]
        calls.append(positions)
        if len(calls) > probe_calls or positions.numel() > PROBE_TOKENS or positions[0] != 1:
            raise AssertionError(f"the LM head's forward ran on {tuple(positions)} positions (call {len(calls)})")

    handle = model.get_output_embeddings().register_forward_pre_hook(guard)
    try:
        yield calls
    finally:
        handle.remove()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("kl_positions", ["labels", "all"])
def test_matches_naive_logits_path(arch, kl_positions):
    student = tiny_model(arch, dtype=torch.float64)
    teacher_model = perturbed_copy(student)
    batch = make_batch()
    loss_fn = SDFTLoss(kl_positions=kl_positions, temperature=TAU)

    expected = naive_loss(student, teacher_model, batch, kl_positions=kl_positions)
    expected.backward()
    expected_grads = _grads(student)
    student.zero_grad(set_to_none=True)

    with head_forward_forbidden(student, probe_calls=1) as probes, head_forward_forbidden(teacher_model):
        out = causal_lm_loss(student, batch, teacher=FrozenCopy(teacher_model), loss=loss_fn)
        out.loss.backward()
        causal_lm_loss(student, batch, teacher=FrozenCopy(teacher_model), loss=loss_fn)  # checked once only
    assert len(probes) == 1
    got = _grads(student)

    assert float(out.kl) > 0, "the teacher differs from the student: the KL must be positive"
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-9, atol=1e-10)
    assert got.keys() == expected_grads.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected_grads[name], rtol=1e-7, atol=1e-9, msg=lambda m: f"{arch} {name}: {m}")


def test_options_reassigned_between_steps_take_effect():
    """A kl_weight schedule reassigns the options: the next call computes the new objective
    (causal_lm_loss passes the head's softcap, whose options the loss caches)."""
    student = tiny_model("llama", dtype=torch.float64)
    teacher_model = perturbed_copy(student)
    batch = make_batch()
    loss_fn = SDFTLoss(kl_weight=1.0, temperature=TAU)
    for weight in (1.0, 0.25, 0.0):
        loss_fn.options = dataclasses.replace(loss_fn.options, kl_weight=weight)
        out = causal_lm_loss(student, batch, teacher=FrozenCopy(teacher_model), loss=loss_fn)
        expected = naive_loss(student, teacher_model, batch, kl_weight=weight)
        torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-9, atol=1e-10, msg=f"{weight}")


def test_no_teacher_is_the_models_own_loss():
    student = tiny_model("llama", dtype=torch.float64)
    batch = make_batch()
    out = causal_lm_loss(student, batch)
    reference = student(**batch).loss  # HF's causal LM loss shifts and ignores -100 the same way
    # HF upcasts logits to float32 for its loss, so agreement is at float32 precision.
    torch.testing.assert_close(out.loss.double(), reference.double(), rtol=1e-6, atol=1e-7)
    assert float(out.kl) == 0.0


def test_padding_ids_in_labels_are_ignored():
    # A collator that copies input_ids into labels without masking padding must not train on pads.
    student = tiny_model("qwen2", dtype=torch.float64)
    batch = make_batch()
    sloppy = dict(batch, labels=batch["input_ids"].clone())
    clean = dict(batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    a, b = causal_lm_loss(student, sloppy), causal_lm_loss(student, clean)
    torch.testing.assert_close(a.loss, b.loss)
    assert int(a.n_tokens) == int(b.n_tokens)


def test_gradient_accumulation_with_num_items_equals_one_large_batch():
    student = tiny_model("llama", dtype=torch.float64)
    teacher = FrozenCopy(perturbed_copy(student))
    big = make_batch(B=8, T=9, seed=3)
    n_items = int((big["labels"][:, 1:] != -100).sum())

    causal_lm_loss(student, big, teacher).loss.backward()
    expected = _grads(student)
    student.zero_grad(set_to_none=True)

    for k in range(4):
        micro = {key: v[2 * k: 2 * k + 2] for key, v in big.items()}
        causal_lm_loss(student, micro, teacher, num_items_in_batch=n_items).loss.backward()
    got = _grads(student)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12)


def test_sdft_model_wrapper_forward_returns_the_loss():
    student = tiny_model("mistral")
    teacher = FrozenCopy(perturbed_copy(student))
    wrapper = SDFTModel(student, teacher, SDFTLoss())
    batch = make_batch()
    out = wrapper(**batch)
    direct = causal_lm_loss(student, batch, teacher)
    torch.testing.assert_close(out.loss, direct.loss)
    # The teacher is not a submodule: not trained, not saved, not broadcast by DDP.
    assert all(n.startswith("student.") for n, _ in wrapper.named_parameters())


def test_frozen_copy_is_a_snapshot():
    student = tiny_model("llama")
    teacher = FrozenCopy(student)
    batch = make_batch()
    before = causal_lm_loss(student, batch, teacher)
    assert float(before.kl) == pytest.approx(0.0, abs=1e-6)  # identical models: KL exactly 0
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = causal_lm_loss(student, batch, teacher)
    assert float(after.kl) > 1e-4
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_bf16_frozen_copy_for_fp32_student():
    student = tiny_model("llama")
    teacher = FrozenCopy(perturbed_copy(student), dtype=torch.bfloat16)
    exact = FrozenCopy(teacher.model).to(torch.float32)
    batch = make_batch()
    a = causal_lm_loss(student, batch, teacher)
    b = causal_lm_loss(student, batch, exact)
    assert a.loss.dtype == torch.float32
    torch.testing.assert_close(a.kl, b.kl, rtol=0.05, atol=1e-3)


def test_sdft_loss_checks_its_settings_when_built():
    with pytest.raises(ValueError, match="impl must be one of .* got 'cuda'"):
        SDFTLoss(impl="cuda")
    with pytest.raises(ValueError, match="kl_positions must be one of .* got 'every'"):
        SDFTLoss(kl_positions="every")
    assert SDFTLoss(impl="triton_chunked").impl == "triton_chunked"


def test_labels_already_shifted_are_refused_with_the_convention():
    student = tiny_model("llama")
    batch = make_batch()
    shifted = dict(batch, labels=batch["labels"][:, 1:])
    with pytest.raises(ValueError, match=r"labels have shape \(3, 8\) but input_ids \(3, 9\): labels must be aligned "
                                         r"with input_ids"):
        causal_lm_loss(student, shifted)


def test_no_check_never_runs_the_head():
    student = tiny_model("gemma2", dtype=torch.float64)
    with head_forward_forbidden(student):
        causal_lm_loss(student, make_batch(), FrozenCopy(perturbed_copy(student)), check_head=False).loss.backward()


def _moe_with_aux():
    import transformers as tf

    from tests.sdft.tiny_models import VOCAB, tiny_config

    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(tiny_config("mixtral", vocab_size=VOCAB, output_router_logits=True,
                                                           router_aux_loss_coef=0.5))


def _lora_student():
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(base, config)


@pytest.mark.parametrize("arch", sorted(CONFIGS) + ["mixtral, aux loss", "llama, LoRA"])
def test_through_a_wrapper_equals_running_the_decoder(arch):
    """``wrapper=``: the whole loss runs inside the wrapper's forward (a forward redirection: the
    wrapper's forward and its hooks run, the model's own forward does not, nor its head): the
    same loss, auxiliary term and gradients as running the decoder alone, and the model's
    forward is its own again afterwards."""
    if arch.startswith("mixtral"):
        student = _moe_with_aux()
    else:
        student = _lora_student() if arch.endswith("LoRA") else tiny_model(arch)
    teacher = AdapterDisabled(student) if arch.endswith("LoRA") else FrozenCopy(perturbed_copy(student))
    batch = make_batch()
    direct = causal_lm_loss(student, batch, teacher, SDFTLoss(kl_weight=0.7))
    direct.loss.backward()
    expected = _grads(student)
    student.zero_grad()

    forwards = []
    hook = student.register_forward_hook(lambda module, args, kwargs, out: forwards.append(sorted(kwargs)),
                                         with_kwargs=True)
    try:
        with head_forward_forbidden(student):
            through = causal_lm_loss(student, batch, teacher, SDFTLoss(kl_weight=0.7), wrapper=student)
    finally:
        hook.remove()
    through.loss.backward()
    assert forwards == [["attention_mask", "input_ids"]]  # once through the wrapper, with the decoder's inputs
    assert "forward" not in student.__dict__  # the redirection is undone
    torch.testing.assert_close(through.loss, direct.loss, rtol=1e-6, atol=0)
    if arch.startswith("mixtral"):
        assert float(through.aux) > 0
        torch.testing.assert_close(through.aux, direct.aux, rtol=1e-6, atol=0)
    grads = _grads(student)
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("student_arch, teacher_arch", [("llama", "gemma2"), ("gemma2", "llama"), ("llama", "cohere")])
def test_a_teacher_of_another_family(student_arch, teacher_arch):
    """Student and teacher heads with different softcaps or logit scales: each model's logits
    are its own forward's (this was refused: "teacher softcap != student softcap")."""
    student = tiny_model(student_arch, dtype=torch.float64)
    teacher_model = tiny_model(teacher_arch, seed=1, dtype=torch.float64)
    batch = make_batch()
    expected = naive_loss(student, teacher_model, batch)
    expected.backward()
    expected_grads = _grads(student)
    student.zero_grad(set_to_none=True)
    out = causal_lm_loss(student, batch, teacher=FrozenCopy(teacher_model), loss=SDFTLoss(temperature=TAU))
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-9, atol=1e-10)
    for name, grad in _grads(student).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-7, atol=1e-9, msg=lambda m: f"{name}: {m}")
