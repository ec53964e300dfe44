"""Every loss on hand-checked cases and against slow references written from the definitions."""

import math

import pytest
import torch

import torch.nn.functional as F

from loku.config import UnlearnConfig
from loku.losses import (METHODS, LossInputs, cross_entropy, global_mean_scales, held_cross_entropy,
                         inverted_hinge_loss, kl_divergence, loss_units, method_loss, sequence_logprob, simnpo_loss,
                         unit_counts)


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


def test_ihl_ce_plus_kl_retain_is_the_sum_of_its_two_terms():
    x = _inputs(3)
    x.ref_retain_logits = x.retain_logits + torch.randn(x.retain_logits.shape, generator=torch.Generator().manual_seed(4))
    ce_r = cross_entropy(x.retain_logits, x.retain_labels)
    kl_r = kl_divergence(x.ref_retain_logits, x.retain_logits, x.retain_labels, "tokens")
    assert kl_r.item() > 0.05   # the two terms differ: the sum says which are added
    terms = {name: method_loss(METHODS["ihl"], x, UnlearnConfig(retain_weight=0.5, ihl_retain_loss=name))["retain"]
             for name in ("ce", "kl", "ce+kl")}
    assert terms["ce"].item() == pytest.approx(0.5 * ce_r.item(), rel=1e-6)
    assert terms["kl"].item() == pytest.approx(0.5 * kl_r.item(), rel=1e-6)
    assert terms["ce+kl"].item() == pytest.approx(0.5 * (ce_r.item() + kl_r.item()), rel=1e-6)


def test_held_cross_entropy_pulls_back_only_the_tokens_that_fell_below_the_reference():
    """held: mean over target tokens of max(0, log p_ref(y) - log p(y)), by hand on two rows; its gradient
    reaches only the fallen tokens, and ihl's held / held+kl retain terms are it (plus the token KL)."""
    ref = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.3, 0.3, 0.4]]]))
    cur = torch.log(torch.tensor([[[0.4, 0.4, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]])).requires_grad_(True)
    labels = torch.tensor([[9, 1, 0]])   # position 0 predicts labels[1] = 1 (0.3 -> 0.4: rose), 1 predicts 0 (0.2 -> 0.1)
    loss = held_cross_entropy(cur, ref, labels)
    assert loss.item() == pytest.approx((0.0 + math.log(0.2 / 0.1)) / 2, rel=1e-6)
    loss.backward()
    assert cur.grad[0, 0].abs().sum() == 0 and cur.grad[0, 1].abs().sum() > 0 and cur.grad[0, 2].abs().sum() == 0
    assert held_cross_entropy(ref, ref, labels).item() == 0.0   # the start model loses nothing

    x = _inputs(5)
    x.ref_retain_logits = x.retain_logits + torch.randn(x.retain_logits.shape, generator=torch.Generator().manual_seed(6))
    held = held_cross_entropy(x.retain_logits, x.ref_retain_logits, x.retain_labels)
    kl_r = kl_divergence(x.ref_retain_logits, x.retain_logits, x.retain_labels, "tokens")
    assert 0 < held.item() < cross_entropy(x.retain_logits, x.retain_labels).item()
    terms = {name: method_loss(METHODS["ihl"], x, UnlearnConfig(retain_weight=0.5, ihl_retain_loss=name))["retain"]
             for name in ("held", "held+kl")}
    assert terms["held"].item() == pytest.approx(0.5 * held.item(), rel=1e-6)
    assert terms["held+kl"].item() == pytest.approx(0.5 * (held.item() + kl_r.item()), rel=1e-6)
    assert METHODS["ihl"].uses_reference(UnlearnConfig(ihl_retain_loss="held"))


def test_every_method_hand_checked_composition():
    x, cfg = _inputs(), UnlearnConfig(retain_weight=0.5)
    ce_f, ce_r = cross_entropy(x.forget_logits, x.forget_labels), cross_entropy(x.retain_logits, x.retain_labels)

    def loss(name, **settings):
        return method_loss(METHODS[name], x, UnlearnConfig(retain_weight=0.5, **settings))

    assert loss("ga")["loss"].item() == pytest.approx(-ce_f.item(), rel=1e-6)
    assert loss("gd")["loss"].item() == pytest.approx(-ce_f.item() + 0.5 * ce_r.item(), rel=1e-6)
    assert loss("kl")["retain"].item() == pytest.approx(0.0, abs=1e-6)  # ref == model on retain
    assert loss("idk", idk_pooling="separate")["loss"].item() == pytest.approx(ce_f.item() + 0.5 * ce_r.item(),
                                                                                rel=1e-6)
    ihl = loss("ihl")
    assert ihl["forget"].item() == pytest.approx(ihl_reference(x.forget_logits, x.forget_labels), abs=1e-6)
    assert ihl["retain"].item() == pytest.approx(0.5 * ce_r.item(), rel=1e-6)
    ihl_kl = loss("ihl", ihl_retain_loss="kl")   # ref == model on retain: nothing to pull back
    assert ihl_kl["forget"].item() == ihl["forget"].item() and ihl_kl["retain"].item() == pytest.approx(0, abs=1e-6)
    # NPO from its definition: -(2/beta) log sigmoid(-beta (log pi(y) - log pi_ref(y))), batch mean.
    beta = cfg.npo_beta
    ratio = sequence_logprob(x.forget_logits, x.forget_labels) - sequence_logprob(x.ref_forget_logits,
                                                                                 x.forget_labels)
    npo = sum(-(2 / beta) * math.log(1 / (1 + math.exp(beta * float(r)))) for r in ratio) / 2
    assert loss("npo")["forget"].item() == pytest.approx(npo, rel=1e-5)
    # NPO with the model equal to its reference is exactly (2/beta) log 2.
    x.ref_forget_logits = x.forget_logits
    assert loss("npo")["forget"].item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    # SimNPO from its definition: gamma * -(2/b) log sigmoid(b (mean nll - delta)), batch mean, gamma = 0.125.
    avg = sequence_logprob(x.forget_logits, x.forget_labels, mean=True)
    b, delta = cfg.simnpo_beta, cfg.simnpo_margin
    simnpo = sum(-(2 / b) * math.log(1 / (1 + math.exp(-b * (-float(a) - delta)))) for a in avg) / 2
    assert loss("simnpo")["forget"].item() == pytest.approx(0.125 * simnpo, rel=1e-5)
    assert loss("simnpo", forget_weight=1.0)["forget"].item() == pytest.approx(simnpo, rel=1e-5)


def test_ihl_stays_bounded_where_ga_diverges():
    """Gradient descent on IHL settles; on GA the loss runs off to -inf (the paper's motivation)."""
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 10, (1, 6), generator=g)
    for name in ("ga", "ihl"):
        logits = torch.randn(1, 6, 10, generator=g).requires_grad_(True)
        opt = torch.optim.SGD([logits], lr=5.0)
        for _ in range(200):
            opt.zero_grad()
            loss = (method_loss(METHODS["ga"], LossInputs(logits, labels), None)["loss"] if name == "ga"
                    else inverted_hinge_loss(logits, labels))
            loss.backward()
            opt.step()
        if name == "ga":
            assert loss.item() < -20
        else:
            assert 0.0 <= loss.item() < 1.0


# ------------------------------------------------------------------------------------------- reference code
# Each reference below transcribes the formula of the named repository and file, in torch, on logits.

def _batch(seed, b=3, t=6, v=9, qa=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    if qa:   # the question is never a target (TOFU's and loku's QA batches), padding neither
        labels[:, :2] = -100
    labels[0, -2:] = -100
    return logits, labels


def simnpo_reference(logits, labels, beta, delta):
    """locuslab/open-unlearning src/trainer/unlearn/simnpo.py (SimNPO.compute_loss) with
    src/trainer/utils.py compute_batch_nll; OPTML-Group/Unlearn-Simple TOFU/dataloader.py 'simnpo_grad_diff'
    computes the same with gamma in place of delta."""
    shifted_labels = labels[..., 1:].contiguous()
    shifted_logits = logits[..., :-1, :].contiguous()
    nll = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(
        shifted_logits.transpose(-1, -2), shifted_labels).sum(dim=-1)
    loss_mask = labels != -100
    forget_loss = nll / loss_mask.sum(-1) - delta
    return -F.logsigmoid(beta * forget_loss).mean() * 2 / beta


@pytest.mark.parametrize("beta,delta", [(4.5, 0.0), (2.5, 0.3), (0.7, -0.1)])
def test_simnpo_matches_openunlearning(beta, delta):
    logits, labels = _batch(4)
    expected = simnpo_reference(logits, labels, beta, delta)
    torch.testing.assert_close(simnpo_loss(logits, labels, beta, delta), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(simnpo_loss(logits, labels), simnpo_reference(logits, labels, 4.5, 0.0))


def test_simnpo_method_has_openunlearnings_defaults():
    """configs/trainer/SimNPO.yaml: delta 0.0, beta 4.5, gamma (forget coefficient) 0.125, alpha 1.0;
    the loss is gamma * forget + alpha * retain (src/trainer/unlearn/simnpo.py)."""
    (f, fl), (r, rl) = _batch(5), _batch(6, qa=False)
    x = LossInputs(f, fl, r, rl)
    cfg = UnlearnConfig(method="simnpo")
    assert (cfg.simnpo_beta, cfg.simnpo_margin, cfg.forget_weight, cfg.retain_weight) == (4.5, 0.0, None, 1.0)
    terms = method_loss(METHODS["simnpo"], x, cfg)
    expected = 0.125 * simnpo_reference(f, fl, 4.5, 0.0) + 1.0 * cross_entropy(r, rl)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(terms["forget"], 0.125 * simnpo_reference(f, fl, 4.5, 0.0))


def idk_reference(idk_logits, idk_labels, retain_logits, retain_labels):
    """csm9493/efficient-llm-unlearning TOFU/dataloader.py, loss_type "idk": the refusal batch and the retain
    batch are concatenated and `model(input_ids, labels=labels).loss` is taken once (Hugging Face's causal-LM
    loss: shift by one, mean cross-entropy over the targets that are not -100)."""
    logits = torch.cat((idk_logits, retain_logits), dim=0)
    labels = torch.cat((idk_labels, retain_labels), dim=0)
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    return torch.nn.functional.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1),
                                             ignore_index=-100)


def test_idk_pools_refusal_and_retain_tokens_as_the_papers_code():
    (f, fl), (r, rl) = _batch(7, b=2), _batch(8, b=4, qa=False)   # unequal token counts
    x = LossInputs(f, fl, r, rl)
    terms = method_loss(METHODS["idk"], x, UnlearnConfig(method="idk"))
    torch.testing.assert_close(terms["loss"], idk_reference(f, fl, r, rl), rtol=1e-6, atol=1e-7)
    separate = method_loss(METHODS["idk"], x, UnlearnConfig(method="idk", idk_pooling="separate"))
    torch.testing.assert_close(separate["loss"], cross_entropy(f, fl) + cross_entropy(r, rl))
    assert abs(separate["loss"].item() - terms["loss"].item()) > 0.5   # twice the loss, about


def kl_reference(ref_logits, logits):
    """csm9493/efficient-llm-unlearning TOFU/dataloader.py, loss_type "KL", and locuslab/open-unlearning
    src/trainer/utils.py compute_kl_divergence: log-softmax of both models over every position, flattened to
    (B*T, V), `kl_div(current, ref, reduction="batchmean", log_target=True)`."""
    ref_probs = F.log_softmax(ref_logits, dim=-1).view(-1, ref_logits.shape[-1])
    current_probs = F.log_softmax(logits, dim=-1).view(-1, logits.shape[-1])
    return torch.nn.functional.kl_div(current_probs, ref_probs, reduction="batchmean", log_target=True)


def test_kl_default_is_the_references_batchmean_over_all_positions():
    (r, rl), (ref, _) = _batch(9, qa=False), _batch(10, qa=False)
    rl[1, -3:] = -100   # padding: the reference still averages over its positions
    torch.testing.assert_close(kl_divergence(ref, r, rl), kl_reference(ref, r), rtol=1e-6, atol=1e-7)
    x = LossInputs(r, rl, r, rl, ref_retain_logits=ref)
    torch.testing.assert_close(method_loss(METHODS["kl"], x, UnlearnConfig(method="kl"))["retain"],
                               kl_reference(ref, r), rtol=1e-6, atol=1e-7)
    # "tokens": the mean over the positions that predict a target (loku's former default).
    mask = rl[:, 1:] != -100
    ref_logp, logp = F.log_softmax(ref[:, :-1], -1), F.log_softmax(r[:, :-1], -1)
    per_position = (ref_logp.exp() * (ref_logp - logp)).sum(-1)                  # (B, T-1)
    torch.testing.assert_close(kl_divergence(ref, r, rl, "tokens"), per_position[mask].mean())


@pytest.mark.parametrize("method,settings", [("kl", {}), ("kl", {"kl_reduction": "tokens"}), ("idk", {}),
                                             ("idk", {"idk_pooling": "separate"}), ("npo", {}), ("ihl", {}),
                                             ("ihl", {"ihl_retain_loss": "kl"}),
                                             ("ihl", {"ihl_retain_loss": "ce+kl"})])
def test_global_mean_scales_make_two_shards_equal_one_batch(method, settings):
    """Under DDP each process scales its terms by local count / (global count / world); the mean over the
    processes is then the one-process value, whatever each term averages (tokens, sequences, positions, pooled)."""
    (f, fl), (r, rl), (ref, _) = _batch(11, b=4, qa=False), _batch(12, b=4, qa=False), _batch(13, b=4, qa=False)
    fl[0, 2:] = -100   # unequal token counts between the shards
    rl[3, 1:] = -100
    m, cfg = METHODS[method], UnlearnConfig(method=method, **settings)
    whole = method_loss(m, LossInputs(f, fl, r, rl, ref_forget_logits=ref, ref_retain_logits=ref), cfg)
    shards = [slice(0, 1), slice(1, 4)]
    units = loss_units(m, cfg)
    totals = torch.tensor([sum(unit_counts(units, fl[s], rl[s])[k] for s in shards) for k in units],
                          dtype=torch.float64)
    mean = {}
    for s in shards:
        x = LossInputs(f[s], fl[s], r[s], rl[s], ref_forget_logits=ref[s], ref_retain_logits=ref[s])
        terms = method_loss(m, x, cfg)
        scales = global_mean_scales(units, fl[s], rl[s], lambda t: totals.clone(), world=2)
        for k in units:
            mean[k] = mean.get(k, 0.0) + scales[k] * terms[k].item() / 2
    for k in units:
        assert mean[k] == pytest.approx(whole[k].item(), rel=1e-5), (method, k)
