"""The student's per-row entropy and top-1 accuracy, computed in the loss's own pass.

Checked against code we did not write: ``torch.distributions.Categorical``'s entropy and
``argmax`` over the materialised logits, and TRL's own fused LM head (``ChunkedLogProbFunction``,
whose ``entropy`` and ``is_top1`` feed ``SFTTrainer``'s ``entropy`` and
``mean_token_accuracy``).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributions import Categorical

from sdft_kernels import fused_linear_sdft_loss
from sdft_kernels.reference import transform_logits
from tests.kernels.helpers import assert_close, make_problem, run

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
ALL = ["reference", "torch"] + (["triton", "triton_chunked"] if INTERPRETER else [])
F64 = dict(rtol=1e-9, atol=1e-11)


def _problem(**kw):
    """A ragged problem whose labels are the student's top prediction on about half the
    labelled rows (else random), so that the accuracy is neither 0 nor 1."""
    p = make_problem(N=37, D=24, Dt=20, V=203, bias=True, kl_mask=True, logit_scale=3.0, **kw)
    z = (p.h @ p.W.T + p.b).detach()
    g = torch.Generator().manual_seed(3)
    take = (torch.rand(37, generator=g) < 0.5) & (p.labels != -100)
    p.labels = torch.where(take, z.argmax(-1), p.labels)
    return p


def _expected(p, scale=1.0, softcap=None):
    """Entropy and top-1 per labelled row from the materialised student logits."""
    z = transform_logits((p.h @ p.W.T + p.b).detach(), scale, softcap)
    labelled = p.labels != -100
    entropy = torch.where(labelled, Categorical(logits=z).entropy(), 0.0)
    return entropy, (z.argmax(-1) == p.labels) & labelled


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(divergence="jsd", jsd_beta=0.3, softcap=4.0), dict(reduction="none", student_logit_scale=1.5),
     dict(teacher=False, student_softcap=2.5)],
    ids=["forward_kl", "jsd+softcap", "none+scale", "no-teacher+softcap"],
)
def test_entropy_and_top1_of_the_student(impl, kw):
    teacher = kw.pop("teacher", True)
    p = _problem(teacher=teacher)
    out, grads = run(p, impl=impl, chunk_size=8, metrics=True, **kw)
    cap = kw.get("student_softcap", kw.get("softcap"))
    entropy, top1 = _expected(p, kw.get("student_logit_scale", 1.0), cap)
    assert out.top1.dtype == torch.bool and not out.entropy.requires_grad
    assert 0 < int(top1.sum()) < int((p.labels != -100).sum())
    assert torch.equal(out.top1, top1)
    assert_close(out.entropy, entropy, what=f"{impl} entropy", **F64)
    # The metrics change nothing else.
    plain, plain_grads = run(p, impl=impl, chunk_size=8, **kw)
    assert plain.entropy is None and plain.top1 is None
    assert torch.equal(out.loss.detach(), plain.loss.detach())
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


@pytest.mark.parametrize("impl", ALL)
def test_a_tie_counts_only_for_the_first_maximal_logit(impl):
    """As ``argmax`` (and TRL's ``is_top1``) decides: columns 3 and 5 hold the same largest
    logit in every row; a label of 3 is the top prediction, a label of 5 is not."""
    p = make_problem(N=12, D=8, V=40, bias=True, teacher=False, logit_scale=0.01)
    with torch.no_grad():
        p.W[5] = p.W[3]
        p.b[3] = p.b[5] = 5.0
    p.labels = torch.tensor([3, 5] * 6)
    p.labels[0] = -100
    out, _ = run(p, impl=impl, chunk_size=8, metrics=True)
    assert out.top1.tolist() == [False, False] + [True, False] * 5


@pytest.mark.parametrize("impl", ALL)
def test_masked_vocabulary_and_huge_logits(impl):
    """Entries masked with a bias of -inf contribute 0 log 0 = 0; logits of ~1e4 in float32
    keep the entropy to float32 precision (the running sum is kept relative to the max)."""
    p = _problem(dtype=torch.float32)
    with torch.no_grad():
        p.b[::3] = float("-inf")
        p.h.mul_(1e4 / (p.h @ p.W.T).abs().max())
    p.labels = torch.where(p.labels != -100, (p.h @ p.W.T + p.b).argmax(-1), p.labels)
    out, _ = run(p, impl=impl, chunk_size=8, metrics=True)
    entropy, top1 = _expected(p.cast(torch.float64))
    assert bool(torch.isfinite(out.entropy).all())
    assert torch.equal(out.top1, top1)
    assert_close(out.entropy, entropy, rtol=1e-4, atol=1e-3, what=f"{impl} entropy at logits of 1e4")


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("softcap, scale", [(None, 1.0), (3.0, 0.5)])
def test_equal_trls_fused_lm_head(impl, softcap, scale):
    """TRL's ChunkedLogProbFunction (SFTTrainer's fused head) on the labelled rows, float32."""
    chunked = pytest.importorskip("trl.kernels.chunked_logprob")
    p = _problem(dtype=torch.float32, teacher=False)
    labelled = p.labels != -100
    _, entropy, _, _, is_top1 = chunked.ChunkedLogProbFunction.apply(
        p.h.detach()[labelled], p.W.detach(), p.b.detach(), p.labels[labelled], 1.0, 64, softcap, scale,
        ("entropy", "is_top1"))
    out = fused_linear_sdft_loss(p.h, p.W, p.labels, student_bias=p.b, impl=impl, chunk_size=8, metrics=True,
                                 student_softcap=softcap, student_logit_scale=scale, return_components=True)
    assert torch.equal(out.top1[labelled], is_top1) and not bool(out.top1[~labelled].any())
    assert_close(out.entropy[labelled], entropy, rtol=1e-5, atol=1e-5, what=f"{impl} entropy vs TRL")
    assert bool((out.entropy[~labelled] == 0).all())


@pytest.mark.parametrize("impl", ALL)
def test_float16_backward_formed_gradient_and_no_grad(impl):
    """The paths that form no gradient in the forward (float16; torch.no_grad) give the same
    metrics as float64 within float16's rounding of the inputs."""
    p64 = _problem()
    low = p64.cast(torch.float16)
    out, _ = run(low, impl=impl, chunk_size=8, metrics=True)
    entropy, top1 = _expected(low.cast(torch.float64))
    assert torch.equal(out.top1, top1)
    assert_close(out.entropy, entropy, rtol=1e-5, atol=1e-5, what=f"{impl} float16 entropy")
    with torch.no_grad():
        eval_out = fused_linear_sdft_loss(low.h, low.W, low.labels, low.ht, low.Wt, student_bias=low.b,
                                          teacher_bias=low.bt, kl_mask=low.kl_mask, impl=impl, metrics=True,
                                          chunk_size=8,
                                          return_components=True)
    assert torch.equal(eval_out.entropy, out.entropy) and torch.equal(eval_out.top1, out.top1)
