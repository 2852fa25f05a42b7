"""`sdft eval`: exact match (and the SliCK classes) of any causal LM on a QA file."""

from __future__ import annotations

import json

import torch

from sdft.cli import main
from sdft.demo.pretrain import build_model, model_config
from sdft.demo.tokenizer import build_tokenizer
from sdft.demo.world import ToyWorld, WorldSpec


def test_sdft_eval_scores_a_qa_file(tmp_path, capsys):
    world = ToyWorld.generate(WorldSpec(seed=0, n_old=20, n_new=6))
    tok = build_tokenizer(world)
    model = build_model(model_config(tok, hidden_size=32, intermediate_size=64), seed=0)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = world.splits()["train_known"][:12]
    with open(tmp_path / "qa.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"q": r["question"], "a": r["answer"]}) + "\n")
    torch.manual_seed(0)
    rc = main(["eval", str(tmp_path / "model"), str(tmp_path / "qa.jsonl"), "--question-field", "q",
               "--answer-field", "a", "--classify", "2", "--max-new-tokens", "2", "--out", str(tmp_path / "r.json")])
    assert rc == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n"] == 12 and 0 <= result["correct"] <= 12
    assert result["exact_match"] == result["correct"] / 12
    k = result["knowledge"]
    assert k["known"] == result["correct"] and k["known"] + k["maybe"] + k["unknown"] == k["total"] == 12
    assert json.loads(capsys.readouterr().out) == result
