"""The reference itself, against independent formulas and an outside oracle (Liger-Kernel)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdft_kernels import LossOptions, reference_sdft_loss
from tests.kernels.helpers import assert_close, make_problem

F64 = dict(rtol=1e-10, atol=1e-12)


def _by_hand(p, divergence, beta, tau):
    """The objective from torch.nn.functional building blocks, one row at a time."""
    z_s, z_t = p.h @ p.W.T, p.ht @ p.Wt.T
    ce = F.cross_entropy(z_s, p.labels, reduction="none", ignore_index=-100)
    ls, lt = F.log_softmax(z_s / tau, -1), F.log_softmax(z_t / tau, -1)
    if divergence == "forward_kl":
        d = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    elif divergence == "reverse_kl":
        d = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
    else:
        m = beta * lt.exp() + (1 - beta) * ls.exp()
        d = beta * F.kl_div(m.log(), lt, log_target=True, reduction="none").sum(-1) + (1 - beta) * F.kl_div(
            m.log(), ls, log_target=True, reduction="none"
        ).sum(-1)
    mask = p.labels != -100
    return (ce.sum() + tau**2 * (d * mask).sum()) / mask.sum()


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.25)])
def test_reference_matches_functional_formulas(divergence, beta):
    p = make_problem(N=31, D=16, V=77)
    out = reference_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, options=LossOptions(divergence=divergence, jsd_beta=beta, temperature=0.7))
    assert_close(out.loss, _by_hand(p, divergence, beta, 0.7), what="reference loss", **F64)


def test_forward_kl_gradient_is_the_papers():
    """d loss / d z_s = softmax(z_s) - onehot(y) + lambda tau (softmax(z_s/tau) - softmax(z_t/tau))."""
    p = make_problem(N=17, D=16, V=50, ignore_frac=0.0)
    # With an identity head the hidden states are the logits, so d/dh is d/dz.
    z_s = (p.h @ p.W.T).detach().requires_grad_(True)
    z_t = (p.ht @ p.Wt.T).detach()
    eye = torch.eye(50, dtype=torch.float64)
    out = reference_sdft_loss(z_s, eye, p.labels, z_t, eye,
                              options=LossOptions(reduction="sum", kl_weight=1.5, temperature=0.5))
    (g,) = torch.autograd.grad(out.loss, z_s)
    expected = torch.softmax(z_s, -1) - F.one_hot(p.labels, 50) + 1.5 * 0.5 * (
        torch.softmax(z_s / 0.5, -1) - torch.softmax(z_t / 0.5, -1)
    )
    assert_close(g, expected.detach(), what="grad wrt logits", **F64)
