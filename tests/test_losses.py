"""Every loss on hand-checked cases and against slow references written from the definitions."""

import math

import pytest
import torch

from loku.losses import (METHODS, LossInputs, LossSettings, cross_entropy, inverted_hinge_loss, kl_divergence,
                         sequence_logprob)


def ihl_reference(logits, labels, ignore_index=-100):
    """Loop over every target token: 1 + p(y) - max over v != y of p(v)."""
    total, count = 0.0, 0
    B, T, V = logits.shape
    for b in range(B):
        for t in range(T - 1):
            y = int(labels[b, t + 1])
            if y == ignore_index:
                continue
            p = torch.softmax(logits[b, t].double(), -1)
            others = [float(p[v]) for v in range(V) if v != y]
            total += 1 + float(p[y]) - max(others)
            count += 1
    return total / count


def test_ihl_matches_reference_and_bounds():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    value = inverted_hinge_loss(logits, labels)
    assert value.dim() == 0
    assert value.item() == pytest.approx(ihl_reference(logits, labels), abs=1e-6)
    # Extremes: a confident correct token gives ~2, a confident wrong one ~0.
    sure = torch.full((1, 2, 5), -30.0)
    sure[0, 0, 3] = 30.0
    assert inverted_hinge_loss(sure, torch.tensor([[0, 3]])).item() == pytest.approx(2.0, abs=1e-6)
    assert inverted_hinge_loss(sure, torch.tensor([[0, 1]])).item() == pytest.approx(0.0, abs=1e-6)


def test_ihl_bounds_random():
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(2, 9, 50, generator=g) * (seed + 1) * 4
        labels = torch.randint(0, 50, (2, 9), generator=g)
        v = inverted_hinge_loss(logits, labels).item()
        assert 0.0 <= v <= 2.0


def test_ihl_gradient_pushes_target_down_and_runner_up_up():
    """d/dz of 1 + p_y - p_o (o = runner-up): target  p_y(1 - p_y + p_o) > 0, runner-up -p_o(1 + p_y - p_o) < 0,
    any other v: -p_v (p_y - p_o), a pure renormalisation term, smaller per unit of probability."""
    z = torch.tensor([[[4.0, 1.0, 3.0, 0.5, -1.0], [0.0] * 5]], requires_grad=True)
    inverted_hinge_loss(z, torch.tensor([[0, 0]])).backward()
    grad, p = z.grad[0, 0], torch.softmax(z[0, 0].detach(), -1)
    py, po = p[0], p[2]
    expected = -p * (py - po)
    expected[0], expected[2] = py * (1 - py + po), -po * (1 + py - po)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    assert grad[0] > 0 and grad[2] < 0  # descent: target logit down, runner-up up
    per_prob = -grad / p
    assert all(per_prob[2] > per_prob[v] for v in (1, 3, 4))
    assert torch.all(z.grad[0, 1] == 0)  # the last position predicts nothing


def test_ihl_bf16_logits_use_float32_softmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 40, generator=g)
    labels = torch.randint(0, 40, (2, 6), generator=g)
    a = inverted_hinge_loss(logits.bfloat16(), labels)
    assert a.dtype == torch.float32
    assert a.item() == pytest.approx(ihl_reference(logits.bfloat16().float(), labels), abs=1e-5)


def test_cross_entropy_hand_checked():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[-100, 0, 1]])
    expected = -(math.log(0.5) + math.log(0.8)) / 2
    assert cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert sequence_logprob(logits, labels).item() == pytest.approx(math.log(0.5) + math.log(0.8), rel=1e-6)
    assert sequence_logprob(logits, labels, mean=True).item() == pytest.approx(-expected, rel=1e-6)


def test_kl_zero_for_same_model_and_hand_value():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 6, generator=g)
    labels = torch.randint(0, 6, (2, 4), generator=g)
    assert kl_divergence(logits, logits, labels).item() == pytest.approx(0.0, abs=1e-6)
    p, q = torch.tensor([0.7, 0.3]), torch.tensor([0.4, 0.6])
    ref, cur = torch.log(p).view(1, 1, 2).repeat(1, 2, 1), torch.log(q).view(1, 1, 2).repeat(1, 2, 1)
    expected = float((p * (p / q).log()).sum())
    assert kl_divergence(ref, cur, torch.tensor([[0, 1]])).item() == pytest.approx(expected, rel=1e-5)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    f, r = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    fl, rl = torch.randint(0, 7, (2, 5), generator=g), torch.randint(0, 7, (2, 5), generator=g)
    return LossInputs(f, fl, r, rl, ref_forget_logits=f + 0.5 * torch.randn(2, 5, 7, generator=g),
                      ref_retain_logits=r.clone())


def test_every_method_hand_checked_composition():
    x, s = _inputs(), LossSettings(retain_weight=0.5)
    ce_f, ce_r = cross_entropy(x.forget_logits, x.forget_labels), cross_entropy(x.retain_logits, x.retain_labels)
    assert METHODS["ga"].fn(x, s)["loss"].item() == pytest.approx(-ce_f.item(), rel=1e-6)
    assert METHODS["gd"].fn(x, s)["loss"].item() == pytest.approx(-ce_f.item() + 0.5 * ce_r.item(), rel=1e-6)
    assert METHODS["kl"].fn(x, s)["retain"].item() == pytest.approx(0.0, abs=1e-6)  # ref == model on retain
    assert METHODS["idk"].fn(x, s)["loss"].item() == pytest.approx(ce_f.item() + 0.5 * ce_r.item(), rel=1e-6)
    ihl = METHODS["ihl"].fn(x, s)
    assert ihl["forget"].item() == pytest.approx(ihl_reference(x.forget_logits, x.forget_labels), abs=1e-6)
    # NPO from its definition: -(2/beta) log sigmoid(-beta (log pi(y) - log pi_ref(y))), batch mean.
    beta = s.npo_beta
    ratio = sequence_logprob(x.forget_logits, x.forget_labels) - sequence_logprob(x.ref_forget_logits,
                                                                                 x.forget_labels)
    npo = sum(-(2 / beta) * math.log(1 / (1 + math.exp(beta * float(r)))) for r in ratio) / 2
    assert METHODS["npo"].fn(x, s)["forget"].item() == pytest.approx(npo, rel=1e-5)
    # NPO with the model equal to its reference is exactly (2/beta) log 2.
    x.ref_forget_logits = x.forget_logits
    assert METHODS["npo"].fn(x, s)["forget"].item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    avg = sequence_logprob(x.forget_logits, x.forget_labels, mean=True)
    b, gm = s.simnpo_beta, s.simnpo_gamma
    simnpo = sum(-(2 / b) * math.log(1 / (1 + math.exp(b * float(a) + gm))) for a in avg) / 2
    assert METHODS["simnpo"].fn(x, s)["forget"].item() == pytest.approx(simnpo, rel=1e-5)


def test_ihl_stays_bounded_where_ga_diverges():
    """Gradient descent on IHL settles; on GA the loss runs off to -inf (the paper's motivation)."""
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 10, (1, 6), generator=g)
    for name in ("ga", "ihl"):
        logits = torch.randn(1, 6, 10, generator=g).requires_grad_(True)
        opt = torch.optim.SGD([logits], lr=5.0)
        for _ in range(200):
            opt.zero_grad()
            loss = (METHODS["ga"].fn(LossInputs(logits, labels), LossSettings())["loss"] if name == "ga"
                    else inverted_hinge_loss(logits, labels))
            loss.backward()
            opt.step()
        if name == "ga":
            assert loss.item() < -20
        else:
            assert 0.0 <= loss.item() < 1.0
