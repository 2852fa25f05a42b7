"""Teacher sources: the hidden-state cache and the adapter-disabled PEFT base."""

from __future__ import annotations

import pytest
import torch

from sdft import causal_lm_loss
from sdft.teacher import AdapterDisabled, FrozenCopy, HiddenStateCache
from tests.sdft.tiny_models import make_batch, perturbed_copy, tiny_model


def _examples(batch):
    """Rows of a right-padded batch as dataset examples with ids."""
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        rows.append({"id": f"ex{i}", "input_ids": batch["input_ids"][i, :n].tolist()})
    return rows


@pytest.fixture
def setup(tmp_path):
    student = tiny_model("llama")
    teacher_model = perturbed_copy(student)
    batch = make_batch(B=4, T=9, seed=5)
    examples = _examples(batch)
    batch = dict(batch, id=[ex["id"] for ex in examples])
    return student, teacher_model, batch, examples, tmp_path


def test_cached_kl_equals_live_teacher(setup):
    student, teacher_model, batch, examples, tmp = setup
    cache = HiddenStateCache.build(teacher_model, examples, tmp / "cache", dtype=torch.float32, batch_size=3)
    live = causal_lm_loss(student, batch, FrozenCopy(teacher_model))
    cached = causal_lm_loss(student, batch, cache)
    assert float(live.kl) > 0
    torch.testing.assert_close(cached.kl, live.kl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cached.loss, live.loss, rtol=1e-5, atol=1e-7)


def test_bf16_cache_is_close_and_reopens(setup):
    student, teacher_model, batch, examples, tmp = setup
    HiddenStateCache.build(teacher_model, examples, tmp / "c16", dtype=torch.bfloat16)
    cache = HiddenStateCache(tmp / "c16")  # reopened from disk
    live = causal_lm_loss(student, batch, FrozenCopy(teacher_model))
    cached = causal_lm_loss(student, batch, cache)
    torch.testing.assert_close(cached.kl, live.kl, rtol=0.05, atol=1e-3)


def test_cache_refuses_mismatches(setup):
    student, teacher_model, batch, examples, tmp = setup
    cache = HiddenStateCache.build(teacher_model, examples, tmp / "cache", dtype=torch.float32)
    cache.check_matches(examples, teacher_model)  # the right data and model pass
    with pytest.raises(ValueError, match="holds 4 examples, the dataset has 3"):
        cache.check_matches(examples[:3])
    longer = [dict(ex) for ex in examples]
    longer[1]["input_ids"] = longer[1]["input_ids"] + [5]
    with pytest.raises(ValueError, match="'ex1' has .* tokens but cache"):
        cache.check_matches(longer)
    with pytest.raises(ValueError, match="head weights differ"):
        cache.check_matches(model=student)
    wider = tiny_model("gpt2")
    with pytest.raises(ValueError, match="head"):
        cache.check_matches(model=wider)
    bad = dict(batch, id=["ex0", "ex1", "ex2", "nope"])
    with pytest.raises(KeyError, match="'nope'"):
        causal_lm_loss(student, bad, cache)
    shifted = dict(batch, attention_mask=batch["attention_mask"].clone())
    shifted["attention_mask"][0, -1] = 1 - shifted["attention_mask"][0, -1]
    with pytest.raises(ValueError, match="'ex0': batch has"):
        causal_lm_loss(student, shifted, cache)
    anonymous = {k: v for k, v in batch.items() if k != "id"}  # as TRL's collators deliver rows
    by_tokens = causal_lm_loss(student, anonymous, cache)
    torch.testing.assert_close(by_tokens.loss, causal_lm_loss(student, batch, cache).loss, rtol=0, atol=0)
    anonymous["input_ids"] = anonymous["input_ids"].clone()
    anonymous["input_ids"][2, 1] = anonymous["input_ids"][2, 1] % 50 + 3
    with pytest.raises(ValueError, match=r"row 2, columns 0\.\.\d+ \(\d+ tokens\): cache .* holds no document"):
        causal_lm_loss(student, anonymous, cache)


def test_cache_is_keyed_on_token_content_and_model_weights(setup):
    """Same ids and lengths but other tokens, or another model with the very same head: both
    would silently distil towards the wrong states, so both are refused."""
    student, teacher_model, batch, examples, tmp = setup
    cache = HiddenStateCache.build(teacher_model, examples, tmp / "cache", dtype=torch.float32)
    other = [dict(ex) for ex in examples]
    other[2]["input_ids"] = other[2]["input_ids"][::-1]
    with pytest.raises(ValueError, match="'ex2' has other tokens than cache"):
        cache.check_matches(other)
    swapped = dict(batch, input_ids=batch["input_ids"].clone())
    swapped["input_ids"][1, 1] = swapped["input_ids"][1, 1] % 50 + 3  # a different token, same length
    with pytest.raises(ValueError, match="'ex1': the batch's tokens differ"):
        causal_lm_loss(student, swapped, cache)
    same_head = perturbed_copy(teacher_model, seed=7)
    same_head.get_output_embeddings().weight.data.copy_(teacher_model.get_output_embeddings().weight)
    with pytest.raises(ValueError, match="model weights differ"):
        cache.check_matches(examples, same_head)


def test_adapter_disabled_teacher_is_the_base_model():
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    reference = perturbed_copy(base, scale=0.0)  # an untouched copy of the base weights
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = make_batch()
    teacher = AdapterDisabled(lora)
    with_adapters = causal_lm_loss(lora, batch, teacher)
    base_teacher = causal_lm_loss(lora, batch, FrozenCopy(reference))
    torch.testing.assert_close(with_adapters.kl, base_teacher.kl, rtol=1e-5, atol=1e-7)
    assert float(with_adapters.kl) > 0  # the adapters (non-zero init) move the student away
    out = teacher(batch)
    assert not out.hidden.requires_grad
    with_adapters.loss.backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)


def test_public_names_keep_their_import_paths():
    """HiddenStateCache and its fingerprints live in sdft.hidden_state_cache, what a teacher
    gives in sdft.teacher_output; sdft.teacher still exports them all."""
    import sdft.teacher as teacher
    from sdft import hidden_state_cache, teacher_output

    for name in ("HiddenStateCache", "token_fingerprint", "model_fingerprint", "final_hidden_width"):
        assert getattr(teacher, name) is getattr(hidden_state_cache, name), name
    for name in ("TeacherOutput", "TeacherSource"):
        assert getattr(teacher, name) is getattr(teacher_output, name), name
    assert all(hasattr(teacher, name) for name in teacher.__all__)
