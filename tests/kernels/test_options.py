"""The settings as one object: the entry point takes them whole or as keywords, and
``LossOptions.with_heads`` fits them to the model heads at hand."""

from __future__ import annotations

import pytest
import torch

from sdft_kernels import LossOptions, fused_linear_sdft_loss
from tests.kernels.helpers import make_problem


def test_options_whole_or_as_keywords_give_the_same_loss():
    p = make_problem(N=19, D=8, V=40, bias=True, kl_mask=True)
    settings = dict(kl_weight=0.7, temperature=0.6, divergence="jsd", jsd_beta=0.3, softcap=4.0, reduction="sum")
    by_keywords = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, student_bias=p.b, kl_mask=p.kl_mask,
                                         return_components=True, **settings)
    whole = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, student_bias=p.b, kl_mask=p.kl_mask,
                                   options=LossOptions(**settings), return_components=True)
    for name, a, b in zip(by_keywords._fields, by_keywords, whole):
        assert (a is None and b is None) or torch.equal(a, b), name
    default = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, kl_mask=p.kl_mask)
    assert default.dim() == 0 and not isinstance(default, tuple)  # a plain call: the scalar loss alone


def test_with_heads_sets_each_models_softcap_and_scale():
    o = LossOptions(kl_weight=0.5)
    assert o.with_heads() is o and o.with_heads(softcap=None) is o  # nothing changes
    both = o.with_heads(softcap=30.0)
    assert (both.student_cap, both.teacher_cap, both.softcap) == (30.0, 30.0, None)
    assert both.kl_weight == 0.5
    each = o.with_heads(softcap=30.0, teacher_softcap=None, student_logit_scale=0.5, teacher_logit_scale=2.0)
    assert (each.student_cap, each.teacher_cap) == (30.0, None)
    assert (each.student_logit_scale, each.teacher_logit_scale) == (0.5, 2.0)
    teacher_only = o.with_heads(teacher_softcap=10.0)
    assert (teacher_only.student_cap, teacher_only.teacher_cap) == (None, 10.0)
    with pytest.raises(ValueError, match="student_logit_scale.*-1"):
        o.with_heads(student_logit_scale=-1.0)


def test_with_heads_refuses_a_head_unlike_the_configured_softcap():
    o = LossOptions(softcap=30.0)
    assert o.with_heads(softcap=30.0) is o
    assert o.with_heads(teacher_softcap=30.0) is o
    with pytest.raises(ValueError, match="configured with softcap 30.0, but the student's head applies 50.0"):
        o.with_heads(softcap=50.0)
    with pytest.raises(ValueError, match="configured with softcap 30.0, but the teacher's head applies None"):
        o.with_heads(softcap=30.0, teacher_softcap=None)
    # A cap of the teacher's only leaves the student's head free.
    t = LossOptions(teacher_softcap=10.0)
    assert t.with_heads(softcap=5.0, teacher_softcap=10.0).student_cap == 5.0
    with pytest.raises(ValueError, match="teacher's head applies 5.0"):
        t.with_heads(softcap=5.0)
