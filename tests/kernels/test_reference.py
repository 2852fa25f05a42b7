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


def test_reference_shares_no_code_with_the_fast_paths():
    """The oracle writes its own masks and reduction: a bug in what the fast paths share
    (``reduction.py``, the epilogues, the chunk loop) would otherwise agree with itself."""
    import ast
    import sdft_kernels.reference as reference

    tree = ast.parse(open(reference.__file__).read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "typing", "torch", "torch.nn.functional", "loss_output", "options"}, imported


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("num_items", [None, 5, 0, "tensor"])
@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_reference_reduction_by_hand(reduction, num_items, loss_type):
    """Weights, ``loss_type``, ``kl_mask`` and every reduction and normaliser, from F.cross_entropy
    and F.kl_div written out here."""
    if num_items is not None and reduction != "mean":
        pytest.skip("num_items is the divisor of 'mean'")
    p = make_problem(N=29, D=16, V=61, kl_mask=True)
    p.labels[:3] = -100  # ignored labels; kl_mask is drawn apart from them
    n = torch.tensor([[7.0]]) if num_items == "tensor" else num_items
    o = LossOptions(ce_weight=0.3, kl_weight=1.7, temperature=0.8, reduction=reduction, loss_type=loss_type)
    out = reference_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, kl_mask=p.kl_mask, num_items=n, options=o)

    z_s, z_t = p.h @ p.W.T, p.ht @ p.Wt.T
    ce = F.cross_entropy(z_s, p.labels, reduction="none", ignore_index=-100)
    if loss_type == "dft":
        ce = ce * torch.exp(-ce)
    kl = F.kl_div(F.log_softmax(z_s / 0.8, -1), F.log_softmax(z_t / 0.8, -1), log_target=True,
                  reduction="none").sum(-1) * p.kl_mask
    labelled = int((p.labels != -100).sum())
    divisor = {None: labelled, 5: 5, 0: 1, "tensor": 7}[num_items]
    if reduction == "mean":
        ce, kl = ce.sum() / divisor, kl.sum() / divisor
    elif reduction == "sum":
        ce, kl = ce.sum(), kl.sum()
    assert_close(out.ce, ce, what="ce", **F64)
    assert_close(out.kl, kl, what="kl", **F64)
    assert_close(out.loss, 0.3 * ce + 1.7 * 0.8**2 * kl, what="loss", **F64)
    assert int(out.n_tokens) == labelled
