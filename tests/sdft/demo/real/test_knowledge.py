"""Tests of sdft.demo.real.knowledge: greedy correctness and the sample probability of each gold
answer from one pass, against Hugging Face's own generate and its full logits; the SliCK draw
against its exact probability. Tiny random models and a table tokenizer: seconds, no download."""

from __future__ import annotations

import math

import pytest
import torch

from sdft.demo.real.knowledge import SplitScores, answer_scores, class_counts, knowledge_classes, AnswerScores
from sdft.demo.real.prompts import format_prompt
from tests.sdft.tiny_models import VOCAB, tiny_model


class TableTokenizer:
    """Text -> ids: the strings in ``table`` map to fixed id lists, any other text one id per
    character. Only what the study's encoders call: ``__call__`` and ``pad_token_id``."""

    pad_token_id = 0

    def __init__(self, table: dict[str, list[int]]):
        self.table = table

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        if text in self.table:
            return {"input_ids": list(self.table[text])}
        return {"input_ids": [3 + ord(c) % (VOCAB - 4) for c in text]}


def _questions(n: int) -> list[str]:
    # Ragged prompt lengths.
    return [f"q{i}" + "x" * (i % 5) for i in range(n)]


@torch.no_grad()
def _oracle(model, prompt_ids: list[int], answer: list[int], temperature: float) -> tuple[bool, float]:
    """Greedy: HF's generate reproduces ``answer``; log p: the model's own full logits, float64."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(answer),
                         do_sample=False, pad_token_id=0, eos_token_id=None)
    greedy = out[0, len(prompt_ids):].tolist() == answer
    full = torch.tensor([prompt_ids + answer])
    logits = model(input_ids=full).logits[0, len(prompt_ids) - 1:-1].double()
    log_p = torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(answer)[:, None]).sum()
    return greedy, float(log_p)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])   # gemma2: a softcap between decoder and logits
def test_scores_match_generate_and_the_model_logits(arch):
    model = tiny_model(arch).eval()
    tok = TableTokenizer({})
    questions = _questions(7)
    rows, answers = [], []
    for i, q in enumerate(questions):
        prompt = tok(format_prompt(q))["input_ids"]
        # Half the answers are the model's own greedy continuation (so greedy is right), half not;
        # answers of 2 to 4 tokens.
        length = 2 + i % 3
        ids = torch.tensor([prompt])
        greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length,
                                do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        answer = greedy if i % 2 == 0 else [(t + 1) % VOCAB or 1 for t in greedy]
        tok.table[f" a{i}\n"] = answer
        rows.append({"question": q, "answer": f"a{i}", "relation": "r"})
        answers.append((prompt, answer))
    scores = answer_scores(model, tok, rows, temperatures=(0.5, 1.0), batch_size=3)
    for i, (prompt, answer) in enumerate(answers):
        for t in (0.5, 1.0):
            greedy, log_p = _oracle(model, prompt, answer, t)
            assert bool(scores.greedy[i]) == greedy == (i % 2 == 0)
            assert scores.log_p[t][i].item() == pytest.approx(log_p, abs=1e-4), (i, t)


def test_one_draw_per_fact_matches_sampling_answers():
    """The chance that one of k sampled answers is exactly right, estimated by sampling with HF's
    generate, equals what knowledge_classes draws from."""
    model = tiny_model("llama").eval()
    with torch.no_grad():  # peakier, so that some two-token answer is sampled often
        model.get_output_embeddings().weight.mul_(4.0)
    prompt = TableTokenizer({})(format_prompt("q"))["input_ids"]
    ids = torch.tensor([prompt])
    torch.manual_seed(1)
    samples = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=4000, pad_token_id=0,
                             eos_token_id=None)[:, len(prompt):]
    values, counts = samples.unique(dim=0, return_counts=True)
    answer = values[counts.argmax()].tolist()        # the answer sampled most often
    hit = (samples == torch.tensor(answer)).all(1).double()
    tok = TableTokenizer({" a\n": answer})
    scores = answer_scores(model, tok, [{"question": "q", "answer": "a"}], temperatures=(1.0,))
    p = scores.log_p[1.0].exp().item()
    assert 0.01 < p < 0.99
    assert hit.mean().item() == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / len(hit)))
    k = 4
    p_any = 1 - (1 - hit.view(-1, k).max(1).values.mean().item())   # one of k samples right
    n = 20000
    many = AnswerScores(torch.zeros(n, dtype=torch.bool), {1.0: torch.full((n,), math.log(p), dtype=torch.float64)})
    drawn = class_counts(knowledge_classes(many, k=k, temperature=1.0, seed=0))["maybe"] / n
    assert drawn == pytest.approx(1 - (1 - p) ** k, abs=0.015)
    assert p_any == pytest.approx(1 - (1 - p) ** k, abs=4 * math.sqrt(p_any * (1 - p_any) / 1000))


def test_classes_follow_greedy_and_the_sample_probability():
    greedy = torch.tensor([True, True, False, False, False])
    log_p = torch.tensor([0.0, -50.0, 0.0, -math.inf, -1e-12], dtype=torch.float64)
    classes = knowledge_classes(AnswerScores(greedy, {0.5: log_p}), k=16, temperature=0.5, seed=0)
    # Greedy right -> known whatever p; p = 1 -> some sample is right; p = 0 -> none is.
    assert classes == ["known", "known", "maybe", "unknown", "maybe"]
    assert knowledge_classes(AnswerScores(greedy, {0.5: log_p}), k=0, temperature=0.5, seed=0)[2:] == ["unknown"] * 3
    with pytest.raises(ValueError, match="temperature 1.0"):
        knowledge_classes(AnswerScores(greedy, {0.5: log_p}), k=4, temperature=1.0, seed=0)
    with pytest.raises(ValueError, match="k must be"):
        knowledge_classes(AnswerScores(greedy, {0.5: log_p}), k=-1, temperature=0.5, seed=0)


def test_split_scores_report_counts_classes_and_relations():
    model = tiny_model("llama").eval()
    tok = TableTokenizer({})
    rows = [{"question": q, "answer": f"a{i}", "relation": "r1" if i < 3 else "r2"} for i, q in enumerate(_questions(5))]
    for i, q in enumerate(_questions(5)):
        prompt = tok(format_prompt(q))["input_ids"]
        ids = torch.tensor([prompt])
        greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                                do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        tok.table[f" a{i}\n"] = greedy if i in (0, 3) else [(t + 1) % VOCAB or 1 for t in greedy]
    record = SplitScores(tok, {"heldout_known": rows, "train_unknown": rows[:2]}, k=4, temperature=0.5,
                         seed=0)(model, keep_classes=True)
    assert record["old_facts_correct"] == 2 and record["old_facts_n"] == 5 and record["old_facts"] == 0.4
    assert record["old_facts_by_relation"] == {"r1": [1, 3], "r2": [1, 2]}
    assert record["old_facts_classes"]["known"] == 2 and record["old_facts_classes"]["total"] == 5
    assert record["classes"]["old_facts"][0] == "known" and record["classes"]["old_facts"][3] == "known"
    assert record["new_facts_n"] == 2 and record["classes"]["new_facts"] == record["classes"]["old_facts"][:2]
    assert model.training is False
