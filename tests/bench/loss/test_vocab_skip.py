"""The vocabulary-skip study's block selection and verdicts (bench/loss/vocab_skip.py), on small
hand-made gradients: the study itself needs the real model."""

import torch

from bench.loss.vocab_skip import best_within, format_study, kept_blocks, relative_errors


def test_a_block_is_kept_when_any_entry_reaches_r_times_its_rows_largest():
    g = torch.full((5, 7), 1e-9, dtype=torch.float64)
    g[0, 0] = -1.0       # rows 0-1: scale 1; block of columns 0-2 kept
    g[1, 5] = 2e-3       # >= 2^-10 of 1: the block of columns 3-5 kept too
    g[2, 6] = 4.0        # rows 2-3: scale 4; only the last (ragged, one column) block kept
    g[4, 1] = 1e-3       # row 4 alone: its own scale, column block 0-2 kept
    keep = kept_blocks(g, rows=2, cols=3, r=2.0 ** -10)
    expected = torch.zeros(5, 7, dtype=torch.bool)
    expected[0:2, 0:6] = True
    expected[2:4, 6] = True
    expected[4, 0:3] = True
    assert torch.equal(keep, expected)


def test_relative_errors_are_norm_wise_and_worst_entry():
    truth = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    e = relative_errors(torch.tensor([[3.0, 4.5]]), truth)
    assert abs(e["norm"] - 0.1) < 1e-12 and abs(e["max"] - 0.125) < 1e-12


def _errors(x):
    return {g: {"norm": x, "max": x} for g in ("grad_hidden", "grad_head")}


def test_the_verdict_is_the_least_kept_within_the_dense_error():
    result = {"n_tokens": 4, "vocab": 9, "hidden": 2,
              "dense": {"float32": _errors(1e-7), "bfloat16": _errors(1e-3)},
              "skips": [{"block": [4, 1], "r_log2": -24, "kept": 1.0, **_errors(0.0)},
                        {"block": [4, 1], "r_log2": -16, "kept": 0.6, **_errors(5e-4)},
                        {"block": [4, 1], "r_log2": -12, "kept": 0.2, **_errors(2e-3)}]}
    assert best_within(result, "float32")["kept"] == 1.0
    assert best_within(result, "bfloat16")["r_log2"] == -16
    md = format_study(result)
    assert "- float32: nothing skips" in md and "r = 2^-16, 60.0% of the gradient kept" in md
