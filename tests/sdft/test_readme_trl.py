"""The README's "Coming from TRL / Liger" example runs as written, on a tiny local model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("trl")

from tests.sdft import trl_fixtures as fx  # noqa: E402

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Coming from TRL / Liger"


def readme_example() -> str:
    text = README.read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python block in README section {SECTION!r}"
    return blocks[0]


def test_the_readme_sfttrainer_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = fx.tokenizer(tmp_path / "tiny-model")  # the example's words are in its vocabulary
    fx.model(len(tokenizer)).save_pretrained(tmp_path / "tiny-model")
    code = readme_example()
    assert len(code.strip().splitlines()) <= 14, "the example is meant to stay short"
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    assert trainer.state.log_history[-1]["train_loss"] > 0
    assert type(trainer.teacher).__name__ == "FrozenCopy" and "kl" in trainer._last_components
    assert "position_ids" in next(iter(trainer.get_train_dataloader()))  # packing=True: padding-free rows
