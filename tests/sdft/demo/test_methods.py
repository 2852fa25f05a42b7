"""Tests of sdft.demo.methods: the rows of the table and their lambdas."""

from __future__ import annotations

import pytest

from sdft.demo.methods import ROW_NAMES, build_methods, sdft_key


def test_every_row_once_with_one_sdft_row_per_lambda():
    methods = build_methods(ROW_NAMES, (0.25, 0.5, 1.0, 2.0), temperature=0.5)
    keys = [m.key for m in methods]
    assert keys == ["sft", "sdft_0.25", "sdft_0.5", "sdft_1", "sdft_2", "attention_only", "ffn_only",
                    "mlp_frozen", "known_only"]
    assert len(set(keys)) == len(keys) and len({m.label for m in methods}) == len(methods)
    by_key = {m.key: m for m in methods}
    assert [by_key[sdft_key(w)].kl_weight for w in (0.25, 0.5, 1.0, 2.0)] == [0.25, 0.5, 1.0, 2.0]
    assert "lambda 0.25" in by_key["sdft_0.25"].label and "tau 0.5" in by_key["sdft_0.25"].label
    # Only the SDFT rows have a teacher; only the control drops the unknown facts.
    assert {m.key for m in methods if m.kl_weight > 0} == {"sdft_0.25", "sdft_0.5", "sdft_1", "sdft_2"}
    assert {m.key for m in methods if m.data == "known"} == {"known_only"}
    assert {m.key for m in methods if m.freezes} == {"attention_only", "ffn_only", "mlp_frozen"}


def test_rows_are_selectable_and_checked():
    assert [m.key for m in build_methods(("known_only", "sft"), (), 0.5)] == ["known_only", "sft"]
    assert [m.key for m in build_methods(("sdft",), (1.0, 1.0), 0.5)] == ["sdft_1"]
    with pytest.raises(ValueError, match="unknown demo row"):
        build_methods(("sft", "lora"), (1.0,), 0.5)
    with pytest.raises(ValueError, match="at least one lambda"):
        build_methods(("sdft",), (), 0.5)
    with pytest.raises(ValueError, match="> 0"):
        build_methods(("sdft",), (0.0,), 0.5)
