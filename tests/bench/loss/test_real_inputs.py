"""Tests of bench.loss.real_inputs: the concentration statistics against counts written out by hand on
small logits, and (with the real model installed) the real inputs' shapes and labels."""

from __future__ import annotations

import math

import pytest
import torch

from bench.loss.inputs import IGNORE_FRACTION, IGNORE_INDEX
from bench.loss.real_inputs import RESOLUTIONS, build_real_inputs, concentration, real_hidden_states


def test_concentration_counts_entries_below_resolution():
    # Two rows over V = 6, logits chosen so that the probabilities are known: row 0 puts almost
    # everything on entry 0 (others e^-30 relative), row 1 is uniform.
    V = 6
    weight = torch.eye(V)
    hidden = torch.tensor([[0.0, -30, -30, -30, -30, -30], [0.0] * V])
    labels = torch.tensor([0, IGNORE_INDEX])
    out = concentration(hidden, weight, labels, tau=0.5, kl_weight=1.0, chunk=4)
    f32, bf16 = out["resolutions"]["float32"], out["resolutions"]["bf16"]
    small = math.exp(-30) / (1 + 5 * math.exp(-30))           # ~9e-14: below both resolutions
    assert small < RESOLUTIONS["float32"]
    # Student (tau 1): row 0 has 5 of 6 entries below, row 1 none.
    assert f32["student_p_below"]["max"] == pytest.approx(5 / 6) and f32["student_p_below"]["min"] == 0.0
    assert bf16["teacher_p_below"]["mean"] == pytest.approx(5 / 12)
    # CE gradient only for the labelled row 0: p - onehot has |g_0| = 5 * small, the others small:
    # relative to the largest they are 1/5 each, above both resolutions.
    assert f32["ce_grad_below"]["mean"] == 0.0 and f32["ce_grad_below"]["max"] == 0.0
    # Entries holding all but r of the mass: row 0 one entry, row 1 all six (1/6 each).
    assert f32["student_entries_for_mass"]["min"] == 1 and f32["student_entries_for_mass"]["max"] == 6
    assert out["rows"] == 2 and out["vocabulary"] == V


def test_gradient_shares_and_tiles():
    torch.manual_seed(0)
    N, V = 10, 20
    hidden = torch.randn(N, V) * 12        # peaked rows
    labels = torch.randint(0, V, (N,))
    out = concentration(hidden, torch.eye(V), labels, tau=0.5, kl_weight=1.0, chunk=5)
    z = hidden.double()
    p, q = torch.softmax(z, -1), torch.softmax(z / 0.5, -1)
    g = p.clone()
    g[torch.arange(N), labels] -= 1
    for name, r in RESOLUTIONS.items():
        rmax = g.abs().max(-1, keepdim=True).values
        expected = (g.abs() < r * rmax).double().mean(-1)
        assert out["resolutions"][name]["ce_grad_below"]["mean"] == pytest.approx(float(expected.mean()))
        bound = (p + 0.5 * 2 * q < r * rmax).double().mean(-1)
        assert out["resolutions"][name]["sdft_grad_bound_below"]["mean"] == pytest.approx(float(bound.mean()))
        tiles = []
        for rows in (slice(0, 5), slice(5, 10)):
            a = g[rows].abs()
            for cols in (slice(0, 5), slice(5, 10), slice(10, 15), slice(15, 20)):
                tiles.append(float(a[:, cols].max() < r * a.max()))
        assert out["resolutions"][name]["tiles_below"]["mean"] == pytest.approx(sum(tiles) / len(tiles))


def test_run_refuses_real_inputs_at_another_shape():
    from bench.loss.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--real-inputs"])
    with pytest.raises(SystemExit):
        parse_args(["--real-inputs", "--shape", "256,512,32768"])
    assert parse_args(["--real-inputs", "--shape", "256,576,49152"]).real_inputs


def _needs_model():
    from sdft.demo.real.model import missing_requirements

    if missing_requirements():
        pytest.skip(f"needs {missing_requirements()} installed")


@pytest.mark.slow
def test_real_inputs_are_the_models_states_with_seeded_ignored_labels(tmp_path):
    _needs_model()
    real = real_hidden_states(600, cache_dir=tmp_path)
    assert real.hidden.shape == (600, 576) and real.weight.shape == (49152, 576) and real.labels.shape == (600,)
    assert (tmp_path / "smollm2-hidden-600.pt").exists()
    # The head predicts the labels of real text far better than chance.
    top1 = ((real.hidden @ real.weight.T).argmax(-1) == real.labels).double().mean()
    assert top1 > 0.3
    inputs = build_real_inputs(600, device="cpu", dtype=torch.float32, teacher=True, requires_grad=True,
                               cache_dir=tmp_path)
    assert inputs.n_labelled == 600 - round(IGNORE_FRACTION * 600)
    kept = inputs.labels != IGNORE_INDEX
    assert torch.equal(inputs.labels[kept], real.labels[kept])
    assert torch.equal(inputs.teacher_hidden, inputs.hidden.detach()) and inputs.hidden.requires_grad

    # The microbenchmark's case on these inputs: ours agrees with the reference.
    from bench.loss.measure_case import measure

    spec = {"group": "fwd_bwd", "device": "cpu", "dtype": "float32", "N": 600, "D": 576, "V": 49152,
            "repeats": 1, "warmup": 0, "seed": 1234, "threads": None, "inputs": "real", "real_cache": str(tmp_path)}
    oracle = measure({**spec, "contender": "reference", "oracle": None})
    assert oracle["status"] == "ok", oracle
    ours = measure({**spec, "contender": "ours", "oracle": oracle["oracle_values"]})
    assert ours["status"] == "ok" and ours["agreement"]["agrees"], ours
    wrong = measure({**spec, "contender": "ours", "D": 512, "oracle": None})
    assert wrong["status"] == "error" and "D=576" in wrong["reason"]
