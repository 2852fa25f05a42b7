"""Every causal LM: the model's own objective, or a clear refusal.

The oracle is the model's own ``model(..., labels=...).loss`` (and its gradients), computed by
transformers, not by us. ``test_every_causal_lm_class`` sweeps every class of
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` that builds tiny here (see ``causal_lm_sweep``); a new
transformers release adds its new classes to the sweep by itself, and a class that trains a
different objective without an error fails it. For the classes whose handling is known, the
sweep pins the outcome. The other tests cover the auxiliary loss, and show that the one-time
head check catches what the architecture tables miss.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from sdft import SDFTLoss, SDFTModel, causal_lm_loss
from sdft import architectures
from sdft.architectures import UnsupportedLossTerm, UnsupportedModel
from sdft.head_check import PROBE_TOKENS, ModelHeadMismatch, check_model_head
from sdft.integration import CausalLMLossOutput
from sdft.teacher import FrozenCopy
from sdft_kernels import SDFTLossOutput
from tests.sdft.causal_lm_sweep import MODEL_TYPES, RTOL, build_tiny, grads, sweep_one, worst_gradient_error
from tests.sdft.tiny_models import make_batch, perturbed_copy, tiny_config, tiny_model


# What this transformers version must give: a class that stops matching, or a refusal that
# stops firing, is a change of behaviour to look at, not a silent pass of the sweep.
MUST_MATCH = {
    "llama", "gpt2", "gemma2", "gemma4",  # plain, tied, softcap, softcap in the text config
    # scales: multiply, divide, multiply, divide the hidden states, multiply by a model attribute
    "cohere", "granite", "hyperclovax", "minicpm3", "falcon_h1",
    "recurrent_gemma", "xlstm", "beam",  # softcaps under other names
    "inkling_text", "dory",  # width multiplier + vocabulary slice; learned per-token scale
    "mpt",  # carries a logit_scale it never applies
    "llama4_text", "modernbert-decoder",  # decoder lookup: get_decoder() is the model itself / the output Linear
    "mixtral", "jetmoe", "granitemoe",  # MoE auxiliary loss: two coefficient names, and with a logit scale
}
MUST_REFUSE = {
    "bert": (UnsupportedModel, "bidirectional encoder"),
    "roberta": (UnsupportedModel, "bidirectional encoder"),
    "bart": (UnsupportedModel, "encoder-decoder"),
    "whisper": (UnsupportedModel, "encoder-decoder"),
    "xlnet": (UnsupportedModel, "permutation language model"),
    "cpmant": (UnsupportedModel, "unshifted"),
    "prophetnet": (UnsupportedModel, "n-gram"),
    "bamba": (UnsupportedLossTerm, "z-loss"),  # tiny configs set z_loss_coefficient 0.5
    # Doge's MoE routing mixes router logits across tokens (transformers' own comment says so):
    # only the head check, not a table, knows that.
    "doge": (ModelHeadMismatch, "is not causal as configured"),
}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_causal_lm_class(model_type):
    outcome = sweep_one(model_type)
    what = f"{outcome.class_name} ({model_type}): {outcome.kind}: {outcome.detail}"
    if model_type in MUST_MATCH:
        assert outcome.kind == "matched", what
    elif model_type in MUST_REFUSE:
        error, words = MUST_REFUSE[model_type]
        assert outcome.kind == "refused" and outcome.detail.startswith(error.__name__) and words in outcome.detail, what
    if outcome.kind == "skipped":
        pytest.skip(f"{outcome.class_name}: {outcome.detail}")
    assert outcome.kind in ("matched", "refused"), what


def test_pinned_architectures_are_in_the_mapping():
    assert MUST_MATCH | set(MUST_REFUSE) <= set(MODEL_TYPES)


def test_bamba_without_z_loss_matches():
    torch.manual_seed(0)
    model = tf.BambaForCausalLM(tiny_config("bamba", z_loss_coefficient=0.0)).double()
    batch = make_batch()
    expected = model(**batch, use_cache=False).loss
    torch.testing.assert_close(causal_lm_loss(model, batch).loss, expected.double(), rtol=RTOL, atol=0)


# ---------------------------------------------------------------------------------------------
# MoE auxiliary loss
# ---------------------------------------------------------------------------------------------

def _mixtral(output_router_logits: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config("mixtral", output_router_logits=output_router_logits, router_aux_loss_coef=0.3)
    return tf.MixtralForCausalLM._from_config(config, experts_implementation="eager").double()


def test_moe_aux_loss_is_the_models_own_term_and_reported():
    model = _mixtral(output_router_logits=True)
    batch = make_batch(B=4, T=11, seed=5)
    own = model(**batch, use_cache=False)
    own.loss.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)

    out = causal_lm_loss(model, batch)
    out.loss.backward()
    assert out.aux is not None and not out.aux.requires_grad
    # transformers' load_balancing_loss_func returns float32: agreement at that precision.
    torch.testing.assert_close(out.aux, 0.3 * own.aux_loss.detach().double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, own.loss.double(), rtol=RTOL, atol=0)
    torch.testing.assert_close(out.loss - out.aux, out.ce, rtol=1e-12, atol=0)  # no teacher: loss = ce + aux
    name, error = worst_gradient_error(grads(model), expected)
    assert error < RTOL, f"{name}: {error:.1e}"
    plain = _mixtral(output_router_logits=False)  # the same weights, no auxiliary term
    causal_lm_loss(plain, batch).loss.backward()
    router = "model.layers.0.mlp.gate.weight"
    assert (plain.get_parameter(router).grad - model.get_parameter(router).grad).abs().max() > 1e-3  # the term acts


def test_moe_without_router_logits_adds_nothing():
    model = _mixtral(output_router_logits=False)
    batch = make_batch()
    out = causal_lm_loss(model, batch)
    assert out.aux is None
    torch.testing.assert_close(out.loss, model(**batch, use_cache=False).loss.double(), rtol=RTOL, atol=0)


def test_moe_aux_loss_under_accumulation_and_with_a_teacher():
    # Added to each micro-batch's loss, not divided by num_items_in_batch: as the model's own
    # forward does when the Trainer passes num_items_in_batch.
    model = _mixtral(output_router_logits=True)
    batch = make_batch(B=4, T=9, seed=2)
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    halves = [{k: v[i * 2:(i + 1) * 2] for k, v in batch.items()} for i in range(2)]
    for half in halves:
        own = model(**half, use_cache=False, num_items_in_batch=n_items).loss
        torch.testing.assert_close(causal_lm_loss(model, half, num_items_in_batch=n_items).loss, own.double(),
                                   rtol=RTOL, atol=0)
    teacher = FrozenCopy(perturbed_copy(model))
    plain = _mixtral(output_router_logits=False)
    for half in halves:
        out = causal_lm_loss(model, half, teacher, num_items_in_batch=n_items)
        without = causal_lm_loss(plain, half, teacher, num_items_in_batch=n_items)
        assert float(out.kl) > 0
        torch.testing.assert_close(out.loss - out.aux, without.loss, rtol=1e-12, atol=0)


def test_doge_moe_aux_loss_when_trusted():
    # Refused by the head check (not causal); trusted anyway, its product-key auxiliary term
    # (a different call of load_balancing_loss_func) is the model's own.
    model = build_tiny("doge")
    batch = make_batch()
    own = model(**batch, use_cache=False).loss
    own.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    out = causal_lm_loss(model, batch, check_head=False)
    out.loss.backward()
    assert float(out.aux) > 0
    torch.testing.assert_close(out.loss, own.double(), rtol=RTOL, atol=0)
    assert expected["model.layers.0.mlp.router_gate.weight"].abs().sum() > 0
    name, error = worst_gradient_error(grads(model), expected)
    assert error < RTOL, f"{name}: {error:.1e}"


def test_moe_aux_loss_refuses_non_mean_reductions():
    with pytest.raises(ValueError, match="reduction='sum' has no such term"):
        causal_lm_loss(_mixtral(output_router_logits=True), make_batch(), loss=SDFTLoss(reduction="sum"))


def test_aux_and_metrics_are_fields_that_every_rebuild_keeps():
    """aux, aux_loss, entropy and top1 are fields of the one output type: a rebuild field by
    field (what accelerate, DDP and FSDP do: ``type(out)(*fields)``), ``_replace`` and the old
    name keep them."""
    out = causal_lm_loss(_mixtral(output_router_logits=True), make_batch(), loss=SDFTLoss(metrics=True))
    assert type(out) is SDFTLossOutput and CausalLMLossOutput is SDFTLossOutput
    assert out._fields == ("loss", "ce", "kl", "n_tokens", "entropy", "top1", "aux", "aux_loss")
    for copy in (type(out)(*out), type(out)._make(iter(out)), out._replace(loss=out.loss.detach())):
        for name in ("entropy", "top1", "aux", "aux_loss"):
            assert getattr(copy, name) is getattr(out, name) is not None, name
    assert "aux=" in repr(out) and "entropy=" in repr(out)
    plain = causal_lm_loss(tiny_model("llama"), make_batch())
    assert (plain.entropy, plain.top1, plain.aux, plain.aux_loss) == (None,) * 4


# ---------------------------------------------------------------------------------------------
# The one-time head check
# ---------------------------------------------------------------------------------------------

def _granite(dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    model = tf.GraniteForCausalLM(tiny_config("granite", logits_scaling=4.0)).to(dtype)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_check_refuses_a_transform_the_tables_do_not_know(monkeypatch, dtype):
    # As if Granite were a new architecture: its logit division is unknown to the tables.
    model = _granite(dtype)
    assert check_model_head(model, make_batch()).logits < 1e-2  # known: passes in every dtype
    monkeypatch.delitem(architectures._HEAD_TRANSFORMS, "GraniteForCausalLM")
    with pytest.raises(ModelHeadMismatch, match=r"GraniteForCausalLM \(granite\).*own logits: they differ by"):
        causal_lm_loss(_granite(dtype), make_batch())
    causal_lm_loss(_granite(dtype), make_batch(), check_head=False)  # the switch: trusted as it is


def test_an_auxiliary_loss_the_tables_do_not_know_is_refused(monkeypatch):
    # As if Mixtral were a new MoE class: its family's load_balancing_loss_func gives it away.
    monkeypatch.delitem(architectures._AUX_LOSS, "MixtralForCausalLM")
    with pytest.raises(UnsupportedLossTerm, match=r"MixtralForCausalLM \(mixtral\) asks for router logits"):
        causal_lm_loss(_mixtral(output_router_logits=True), make_batch(), check_head=False)
    # Without that clue, the head check still sees the aux_loss in the model's own output.
    monkeypatch.setattr("sdft.head_check.auxiliary_loss", lambda model: None)
    with pytest.raises(ModelHeadMismatch, match=r"MixtralForCausalLM \(mixtral\) adds an auxiliary loss"):
        check_model_head(_mixtral(output_router_logits=True), make_batch())


def test_check_refuses_a_loss_that_is_not_next_token(monkeypatch):
    # As if Whisper's decoder were a new class: its own loss does not shift the labels.
    monkeypatch.delitem(architectures._NOT_CAUSAL_DECODERS, "WhisperForCausalLM")
    with pytest.raises(ModelHeadMismatch, match=r"WhisperForCausalLM \(whisper\): its own loss is not the next-token "
                                                r"cross-entropy of its logits"):
        causal_lm_loss(build_tiny("whisper"), make_batch())


def test_check_refuses_a_model_that_is_not_causal():
    torch.manual_seed(0)
    model = tf.GemmaForCausalLM(tiny_config("gemma", use_bidirectional_attention=True)).double()
    with pytest.raises(ModelHeadMismatch, match=r"GemmaForCausalLM \(gemma\) is not causal as configured"):
        causal_lm_loss(model, make_batch())


def test_check_runs_once_per_instance_on_a_probe_row():
    model = _granite(torch.float32)
    seen = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
    try:
        batch = make_batch(B=4, T=16)
        for _ in range(3):
            causal_lm_loss(model, batch)
        SDFTModel(model)(**batch)  # the same instance through the wrapper: no new check
        causal_lm_loss(_granite(torch.float32), batch, check_head=False)
    finally:
        handle.remove()
    assert seen == [torch.Size([1, PROBE_TOKENS, model.config.hidden_size])]


def test_check_restores_each_modules_mode():
    model = _granite(torch.float32)
    model.train()
    model.model.layers[0].eval()  # a frozen block kept in eval mode by the user
    causal_lm_loss(model, make_batch())
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training


def test_probe_uses_non_pad_tokens_of_a_left_padded_batch():
    model = _granite(torch.float64)
    batch = make_batch(padding_side="left")
    result = check_model_head(model, batch)
    assert result.logits < 1e-9 and result.causality == 0.0


# ---------------------------------------------------------------------------------------------
# Other entry points
# ---------------------------------------------------------------------------------------------

def test_wrappers_are_looked_up_as_the_model_inside():
    # torch.compile's wrapper is not a subclass of the model: the tables must see through it.
    model = tf.Gemma2ForCausalLM(tiny_config("gemma2", final_logit_softcapping=2.0))
    assert architectures.head_transform(torch.compile(model)).softcap == 2.0
    assert architectures.architecture_name(torch.compile(model)) == "Gemma2ForCausalLM (gemma2)"


def test_peft_student_matches_its_own_loss():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = tf.Qwen2ForCausalLM(tiny_config("qwen2")).double()
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # adapters not zero
    model = peft.get_peft_model(base, lora)
    batch = make_batch()
    expected = model(**batch).loss
    out = causal_lm_loss(model, batch)
    torch.testing.assert_close(out.loss, expected.double(), rtol=RTOL, atol=0)


def test_teacher_of_a_known_transform_uses_it():
    # The teacher's head comes from the same tables: a Dory teacher carries its per-token scale.
    student = build_tiny("dory")
    teacher_model = perturbed_copy(student)
    batch = make_batch()
    out = causal_lm_loss(student, batch, FrozenCopy(teacher_model), SDFTLoss(temperature=0.5))
    with torch.no_grad():
        z_t = teacher_model(**batch, use_cache=False).logits[:, :-1].double()
    z_s = student(**batch, use_cache=False).logits[:, :-1].double()
    valid = batch["labels"][:, 1:] != -100
    log_p_t, log_p_s = F.log_softmax(z_t / 0.5, -1), F.log_softmax(z_s / 0.5, -1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)[valid].mean()
    # Dory's own head returns float32 logits: agreement at that precision.
    torch.testing.assert_close(out.kl.double(), kl.detach(), rtol=1e-5, atol=0)
