"""Packed (padding-free) batches: the same loss, gradients and target count as the same
documents padded in an ordinary batch, for the student and every teacher source."""

from __future__ import annotations

import pytest
import torch

from sdft import SDFTLoss, causal_lm_loss
from sdft.integration import shifted_targets
from sdft.packing import document_spans
from sdft.teacher import AdapterDisabled, FrozenCopy, HiddenStateCache
from sdft.trainer import count_loss_targets
from tests.sdft.tiny_models import VOCAB, perturbed_copy, tiny_model

LENGTHS = (5, 9, 3)  # ragged; the last document has a single target
PROMPT = 2  # the first tokens of each document are an unsupervised prompt
# float64 models. SDPA gives the packed row what it gives the padded rows to rounding; eager
# attention takes its softmax in float32 even in float64, and the block-diagonal and padding
# masks sum their rows in another order (measured: 2e-9 on the loss, 5e-7 on a gradient).
TOLERANCE = {"sdpa": 1e-12, "eager": 2e-6}


def _documents(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def padded_batch(docs, with_labels: bool = True) -> dict:
    """The documents as rows of an ordinary right-padded batch."""
    width = max(map(len, docs))
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, doc in enumerate(docs):
        ids[row, : len(doc)] = torch.tensor(doc)
        mask[row, : len(doc)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if with_labels:
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :PROMPT] = -100
        batch["labels"] = labels
    return batch


def packed_batch(docs, with_labels: bool = True, pad_to: int = 0) -> dict:
    """The documents concatenated into one row, as TRL's padding-free collator lays them out:
    position_ids restarting at 0, no attention mask, flash-attention's varlen keys, the label
    of each document's first token -100, and pad tokens (position 0, label -100) up to a
    multiple of ``pad_to``."""
    ids = [t for doc in docs for t in doc]
    positions = [p for doc in docs for p in range(len(doc))]
    labels = [(-100 if p < PROMPT else t) for doc in docs for p, t in enumerate(doc)]
    pad = (-len(ids)) % pad_to if pad_to else 0
    ids, positions, labels = ids + [0] * pad, positions + [0] * pad, labels + [-100] * pad
    bounds = torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()], dtype=torch.int32)
    batch = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
             "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
             "max_length_q": max(map(len, docs)), "max_length_k": max(map(len, docs)),
             "seq_idx": torch.repeat_interleave(torch.arange(len(docs), dtype=torch.int32),
                                                bounds.diff().long())[None]}
    if pad:  # the pads' varlen entries are left out, as flash-attention never reads them
        batch["seq_idx"] = torch.cat([batch["seq_idx"], torch.zeros(1, pad, dtype=torch.int32)], 1)
    if with_labels:
        batch["labels"] = torch.tensor([labels])
    return batch


def _model(arch: str, attn: str, seed: int = 0):
    model = tiny_model(arch, seed=seed, dtype=torch.float64)
    model.set_attn_implementation(attn)
    return model


def _loss_and_grads(model, batch, teacher, loss):
    model.zero_grad(set_to_none=True)
    out = causal_lm_loss(model, batch, teacher, loss)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("kl_positions", ["labels", "all"])
def test_padding_free_batch_equals_padded_batch(arch, attn, with_labels, kl_positions):
    student = _model(arch, attn)
    teacher = FrozenCopy(perturbed_copy(student, scale=0.2))
    loss = SDFTLoss(kl_weight=0.7, temperature=0.5, kl_positions=kl_positions)
    docs = _documents()
    padded, grads_padded = _loss_and_grads(student, padded_batch(docs, with_labels), teacher, loss)
    packed, grads_packed = _loss_and_grads(student, packed_batch(docs, with_labels, pad_to=8), teacher, loss)

    assert float(padded.kl) > 1e-3  # the teacher differs: the divergence term is exercised
    expected_targets = sum(n - 1 - (PROMPT - 1 if with_labels else 0) for n in LENGTHS)
    assert int(packed.n_tokens) == int(padded.n_tokens) == expected_targets
    tol = TOLERANCE[attn]
    for name in ("loss", "ce", "kl"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), rtol=tol, atol=tol,
                                   msg=lambda m: f"{name}: {m}")
    assert grads_packed.keys() == grads_padded.keys()
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=tol, atol=tol * float(grad.abs().max()),
                                   msg=lambda m: f"{name}: {m}")


def test_without_position_ids_the_documents_would_mix():
    """The control: the same row without its position_ids (what a loss path that drops them
    computes) gives another loss, so the equality above is not vacuous."""
    student = _model("llama", "sdpa")
    docs = _documents()
    padded = causal_lm_loss(student, padded_batch(docs), None, SDFTLoss())
    row = packed_batch(docs)
    mixed = causal_lm_loss(student, {"input_ids": row["input_ids"], "labels": row["labels"]}, None, SDFTLoss())
    assert int(mixed.n_tokens) == int(padded.n_tokens)
    assert abs(float(mixed.loss.detach()) - float(padded.loss.detach())) > 1e-3


def test_targets_never_cross_a_document_boundary():
    docs = _documents()
    row = packed_batch(docs, with_labels=False, pad_to=8)
    labels, target_mask = shifted_targets(row)
    ids = row["input_ids"][0]
    starts = [sum(LENGTHS[:i]) for i in range(1, len(LENGTHS))] + list(range(sum(LENGTHS), ids.numel()))
    for column in range(ids.numel() - 1):
        crosses = column + 1 in starts
        assert bool(target_mask[0, column]) is not crosses, column
        assert int(labels[0, column]) == (-100 if crosses else int(ids[column + 1])), column
    # What the Trainer normalises by is exactly what the loss counts.
    assert int(count_loss_targets(row)) == sum(n - 1 for n in LENGTHS)
    assert int(count_loss_targets(packed_batch(docs))) == sum(n - PROMPT for n in LENGTHS)


def test_matches_trls_padding_free_collator():
    """The layout built here is the one TRL's padding-free collator delivers."""
    sft = pytest.importorskip("trl.trainer.sft_trainer")
    docs = _documents()
    collator = sft.DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    examples = [{"input_ids": d, "labels": [(-100 if p < PROMPT else t) for p, t in enumerate(d)]} for d in docs]
    theirs, ours = collator(examples), packed_batch(docs)
    assert sorted(theirs) == sorted(ours)
    for key, value in ours.items():
        assert torch.equal(torch.as_tensor(theirs[key]), torch.as_tensor(value)), key


def test_document_spans():
    docs = _documents()
    assert document_spans(packed_batch(docs, pad_to=8), 0) == [(0, 5), (5, 14), (14, 17), (17, 18), (18, 19),
                                                               (19, 20), (20, 21), (21, 22), (22, 23), (23, 24)]
    assert document_spans(padded_batch(docs), 2) == [(0, 3)]
    assert document_spans({"input_ids": torch.zeros(1, 4, dtype=torch.long)}, 0) == [(0, 4)]


def test_position_ids_of_another_shape_are_refused():
    row = packed_batch(_documents())
    row["position_ids"] = row["position_ids"][:, :-1]
    with pytest.raises(ValueError, match=r"position_ids have shape \(1, 16\) but input_ids \(1, 17\)"):
        causal_lm_loss(tiny_model("llama"), row)


# ----------------------------------------------------------------------------------------------
# Teacher sources on a packed batch: each gives the teacher of the padded documents
# ----------------------------------------------------------------------------------------------

def _kl(student, batch, teacher):
    return causal_lm_loss(student, batch, teacher, SDFTLoss(kl_weight=1.0, temperature=0.5)).kl


def test_adapter_disabled_teacher_on_a_packed_batch():
    peft = pytest.importorskip("peft")
    base = _model("llama", "sdpa")
    untouched = perturbed_copy(base, scale=0.0)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    docs = _documents()
    packed = _kl(lora, packed_batch(docs, pad_to=8), AdapterDisabled(lora))
    assert float(packed) > 1e-3
    torch.testing.assert_close(packed, _kl(lora, padded_batch(docs), FrozenCopy(untouched)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("built_from", ["documents", "packed rows"])
def test_hidden_state_cache_on_a_packed_batch(tmp_path, built_from):
    student = _model("llama", "sdpa")
    teacher_model = perturbed_copy(student, scale=0.2)
    docs = _documents()
    if built_from == "documents":
        examples = [{"input_ids": d} for d in docs] + [{"input_ids": docs[0]}]  # a duplicate is stored once
    else:  # as SFTTrainer(packing=True).train_dataset holds them
        examples = [{"input_ids": docs[1] + docs[2], "seq_lengths": [9, 3]}, {"input_ids": docs[0], "seq_lengths": [5]}]
    cache = HiddenStateCache.build(teacher_model, examples, tmp_path / "cache", id_field=None, dtype=torch.float32,
                                   batch_size=2)
    assert cache.meta["n_examples"] == 3
    cache.check_matches(examples, teacher_model)
    reopened = HiddenStateCache(tmp_path / "cache")
    assert reopened.id_field is None
    packed = packed_batch(docs, pad_to=8)
    live = _kl(student, packed, FrozenCopy(teacher_model))
    assert float(live) > 1e-3
    torch.testing.assert_close(_kl(student, packed, reopened), live, rtol=1e-6, atol=1e-8)  # float32 storage


def test_hidden_state_cache_refuses_a_document_it_does_not_hold(tmp_path):
    student = _model("llama", "sdpa")
    docs = _documents()
    cache = HiddenStateCache.build(student, [{"input_ids": d} for d in docs], tmp_path / "cache", id_field=None)
    cut = [docs[0], docs[1][:6], docs[2]]  # as a packing strategy that splits documents would
    with pytest.raises(ValueError, match=r"row 0, columns 5\.\.10 \(6 tokens\): cache .* holds no document .* "
                                         r"id_field=None"):
        causal_lm_loss(student, packed_batch(cut), cache)
    with pytest.raises(ValueError, match="no id per document: build the cache with id_field=None"):
        HiddenStateCache.build(student, [{"id": "a", "input_ids": docs[0], "seq_lengths": [5]}], tmp_path / "x")
    with pytest.raises(ValueError, match="1 of the 3 documents"):
        cache.check_matches([{"input_ids": d} for d in cut])
