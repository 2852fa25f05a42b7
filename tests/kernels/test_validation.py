"""Bad input raises before any kernel runs, naming the offending shape, dtype or value."""

from __future__ import annotations

import pytest
import torch

from sdft_kernels import LossOptions, fused_linear_sdft_loss
from tests.kernels.helpers import make_problem


def _call(p=None, **kw):
    p = p or make_problem(N=10, D=8, V=20, dtype=torch.float32)
    args = dict(student_hidden=p.h, student_weight=p.W, labels=p.labels, teacher_hidden=p.ht, teacher_weight=p.Wt)
    args.update(kw)
    return fused_linear_sdft_loss(**args)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(student_weight=torch.randn(20, 9)), ValueError, "hidden size 9"),
        (dict(teacher_weight=torch.randn(21, 8)), ValueError, "vocab size 21"),
        (dict(labels=torch.zeros(11, dtype=torch.long)), ValueError, r"\(10,\).*\(11,\)"),
        (dict(teacher_hidden=torch.randn(9, 8)), ValueError, "9 tokens"),
        (dict(teacher_weight=torch.randn(20, 7)), ValueError, "hidden size 7"),
        (dict(student_weight=torch.ones(20, 8, dtype=torch.int64)), TypeError, "student_weight.*int64"),
        (dict(student_bias=torch.ones(20, dtype=torch.int32)), TypeError, "student_bias.*int32"),
        (dict(labels=torch.zeros(10)), TypeError, "int64"),
        (dict(student_hidden=torch.randn(2, 5, 8)), ValueError, r"2-D.*\(2, 5, 8\)"),
        (dict(teacher_hidden=None), ValueError, "together"),
        (dict(labels=torch.full((10,), 20)), ValueError, r"labels\[0\] = 20"),
        (dict(labels=torch.full((10,), -3)), ValueError, r"labels\[0\] = -3"),
        (dict(temperature=0.0), ValueError, "temperature.*0.0"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(kl_weight=-0.1), ValueError, "kl_weight.*-0.1"),
        (dict(ce_weight=float("nan")), ValueError, "ce_weight"),
        (dict(divergence="kl"), ValueError, "'kl'"),
        (dict(impl="cuda"), ValueError, "'cuda'"),
        (dict(reduction="avg"), ValueError, "'avg'"),
        (dict(jsd_beta=1.5), ValueError, "jsd_beta.*1.5"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(teacher_softcap=-1.0), ValueError, "teacher_softcap.*-1.0"),
        (dict(student_softcap=float("inf")), ValueError, "student_softcap.*inf"),
        (dict(softcap=3.0, student_softcap=3.0), ValueError, "softcap=3.0 sets both"),
        (dict(student_logit_scale=0.0), ValueError, "student_logit_scale.*0.0"),
        (dict(teacher_logit_scale=float("nan")), ValueError, "teacher_logit_scale.*nan"),
        (dict(num_items=0.5), ValueError, "num_items.*0.5"),
        (dict(num_items=-1), ValueError, "num_items.*-1"),
        (dict(num_items=float("nan")), ValueError, "num_items.*nan"),
        (dict(num_items=float("inf")), ValueError, "num_items.*inf"),
        (dict(num_items=True), ValueError, "num_items.*True"),
        (dict(num_items=torch.tensor([3.0, 4.0])), ValueError, r"num_items.*shape \(2,\)"),
        (dict(num_items=torch.tensor(True)), ValueError, "num_items.*bool"),
        (dict(num_items=torch.tensor(0.5)), ValueError, "num_items.*0.5"),
        (dict(num_items=torch.tensor(-2)), ValueError, "num_items.*-2"),
        (dict(kl_mask=torch.ones(10)), ValueError, "kl_mask.*bool"),
        (dict(student_bias=torch.randn(19)), ValueError, r"\(20,\)"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(temprature=0.5), TypeError, r"unexpected keyword arguments \['temprature'\].*temperature"),
        (dict(options=LossOptions(), kl_weight=0.5), TypeError, r"options or their keywords.*\['kl_weight'\]"),
        (dict(options=dict(kl_weight=0.5)), TypeError, "options must be a LossOptions, got dict"),
    ],
)
def test_bad_input_is_named(kw, exc, match):
    with pytest.raises(exc, match=match):
        _call(**kw)


def test_label_validation_can_be_turned_off():
    p = make_problem(N=10, D=8, V=20, dtype=torch.float32, ignore_frac=0.0)
    # Without validation an out-of-range label is the caller's promise; in range it changes nothing.
    a = _call(p, validate_labels=False)
    b = _call(p)
    assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["triton", "triton_chunked"])
def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch, impl):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=f"impl='{impl}' needs CUDA"):
        _call(impl=impl)
