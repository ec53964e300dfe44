"""Every OpenUnlearning method loku added, against a transcription of OpenUnlearning's code on fixed tensors
(or a fixed tiny model), to 1e-6.

Repository: locuslab/open-unlearning. Files and the commits they were read at:
- src/trainer/utils.py (compute_batch_nll, compute_dpo_loss, compute_undial_loss, compute_wga_loss,
  compute_satimp_loss), src/trainer/unlearn/{dpo,undial,wga,satimp,ceu,pdu,rmu}.py: d3d7cf9e6b3c125d16687d4232680d8d83548f1a
- src/trainer/unlearn/gru.py: 911e52a1cdd75e753e868b568257e5d2796af373
- src/trainer/unlearn/lunar.py: a2550b5cc47fe420805cc3e6c396e78bc9862e3e
- src/trainer/unlearn/sibl.py, src/trainer/sparsity.py: a291f94023227b23bfeb19aade3b66e31c9bd783
- src/trainer/unlearn/t3.py, src/model/t3.py: b78505f4ef3da07b9a35dbf4f7125b4d59cc7fc6
- src/trainer/unlearn/lmcleaner_core.py, lmcleaner_batch.py: f08ef4cbde8142716c02e98ca05ec85ed9ccc882
The references below follow that code line by line, with the model's forward replaced by fixed logits where
the code only reads them.
"""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from conftest import tiny_llama
from loku.config import UnlearnConfig
from loku.methods import METHODS, LossInputs, MethodState, method_loss

V = 130   # > 100: UNDIAL's reference indexes logit -100 at ignored positions


def fixed(seed=0, B=3, T=7, V=V):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    labels[2, 5:] = -100
    return logits, labels, g


# ------------------------------------------------------------------------------- transcriptions (utils.py)

def ref_batch_nll(logits, labels):
    # src/trainer/utils.py compute_batch_nll: summed CE per sequence
    shifted_labels = labels[..., 1:].contiguous()
    logits = logits[..., :-1, :].contiguous()
    loss_function = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    return loss_function(logits.transpose(-1, -2), shifted_labels).sum(dim=-1)


def ref_dpo(win, ref_win, win_labels, lose, ref_lose, lose_labels, beta):
    # src/trainer/utils.py compute_dpo_loss
    win_log_ratio = -(ref_batch_nll(win, win_labels) - ref_batch_nll(ref_win, win_labels))
    lose_log_ratio = -(ref_batch_nll(lose, lose_labels) - ref_batch_nll(ref_lose, lose_labels))
    return -2 / beta * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()


def ref_undial(logits, teacher_logits, labels, beta):
    # src/trainer/utils.py compute_undial_loss
    shift_labels = labels[..., 1:].contiguous()
    shift_logits = logits[..., :-1, :].contiguous()
    shift_teacher_logits = teacher_logits[..., :-1, :].contiguous()
    mask = torch.zeros_like(shift_teacher_logits)
    batch_idx = torch.arange(mask.shape[0]).view(-1, 1, 1)
    seq_idx = torch.arange(mask.shape[1]).view(1, -1, 1)
    mask[batch_idx, seq_idx, shift_labels.unsqueeze(-1)] = 1.0
    pre_softmax = shift_teacher_logits - mask * beta
    soft_label = F.softmax(pre_softmax, dim=-1)
    loss_fct = nn.CrossEntropyLoss(reduction="none")
    loss = loss_fct(shift_logits.view(-1, shift_logits.size(-1)), soft_label.view(-1, soft_label.size(-1)))
    return loss.mean()


def ref_wga(logits, labels, beta):
    # src/trainer/utils.py compute_wga_loss
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    lm_loss = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(
        shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
    weight_ce = ((-lm_loss).exp().detach()) ** beta
    return -(weight_ce * lm_loss)[shift_labels.view(-1) != -100].mean()


def ref_satimp(logits, labels, beta1, beta2):
    # src/trainer/utils.py compute_satimp_loss
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    lm_loss = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(
        shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
    weight_sat = ((-lm_loss).exp().detach()) ** beta1
    weight_imp = (1 - (-lm_loss).exp().detach()) ** beta2
    return -((weight_sat * weight_imp) * lm_loss)[shift_labels.view(-1) != -100].mean()


def test_dpo_matches_openunlearning():
    lose, lose_labels, g = fixed(1)
    win = torch.randn(3, 6, V, generator=g, dtype=torch.float64)
    win_labels = torch.randint(0, V, (3, 6), generator=g)
    win_labels[:, :3] = -100
    ref_win, ref_lose = win + 0.3 * torch.randn_like(win), lose + 0.3 * torch.randn_like(lose)
    x = LossInputs(lose, lose_labels, lose, lose_labels, ref_forget_logits=ref_lose, alt_logits=win,
                   alt_labels=win_labels, ref_alt_logits=ref_win)
    cfg = UnlearnConfig(method="dpo")
    got = method_loss(METHODS["dpo"], x, cfg)["forget"]
    want = ref_dpo(win, ref_win, win_labels, lose, ref_lose, lose_labels, 0.1)
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
    # At the start (model == reference) it is (2/beta) log 2, as NPO's
    x.ref_alt_logits, x.ref_forget_logits = win, lose
    assert method_loss(METHODS["dpo"], x, cfg)["forget"].item() == pytest.approx(20 * math.log(2), abs=1e-6)


@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_wga_matches_openunlearning(beta):
    logits, labels, _ = fixed(2)
    x = LossInputs(logits, labels, logits, labels)
    got = method_loss(METHODS["wga"], x, UnlearnConfig(method="wga", wga_beta=beta))
    assert got["forget"].item() == pytest.approx(ref_wga(logits, labels, beta).item(), abs=1e-6)
    # the gradient too: the weight carries none
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    method_loss(METHODS["wga"], LossInputs(a, labels, a, labels), UnlearnConfig(method="wga", wga_beta=beta,
                                                                               retain_weight=0))["loss"].backward()
    ref_wga(b, labels, beta).backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-9, rtol=1e-6)


def test_satimp_matches_openunlearning_with_its_forget_weight():
    logits, labels, _ = fixed(3)
    x = LossInputs(logits, labels, logits, labels)
    got = method_loss(METHODS["satimp"], x, UnlearnConfig(method="satimp"))
    want = ref_satimp(logits, labels, 5.0, 1.0)
    # SatImp.yaml: gamma (forget coefficient) 0.1, alpha (retain) 1
    assert got["forget"].item() == pytest.approx(0.1 * want.item(), abs=1e-7)
    got = method_loss(METHODS["satimp"], x, UnlearnConfig(method="satimp", satimp_beta1=2.0, satimp_beta2=3.0,
                                                          forget_weight=1.0))
    assert got["forget"].item() == pytest.approx(ref_satimp(logits, labels, 2.0, 3.0).item(), abs=1e-6)


def test_undial_matches_openunlearning_where_every_position_has_a_target():
    logits, labels, g = fixed(4)
    labels = torch.randint(0, V, labels.shape, generator=g)           # no -100
    teacher = logits + torch.randn(logits.shape, generator=g, dtype=logits.dtype)
    x = LossInputs(logits, labels, ref_forget_logits=teacher)
    got = method_loss(METHODS["undial"], x, UnlearnConfig(method="undial"))["forget"]
    assert got.item() == pytest.approx(ref_undial(logits, teacher, labels, 10.0).item(), abs=1e-6)


def test_undial_leaves_the_teacher_alone_where_there_is_no_target():
    """OpenUnlearning indexes the teacher's logit -100 (token V-100) at ignored positions and lowers it by beta;
    loku lowers nothing there. Equal to the reference with those positions' adjustment dropped."""
    logits, labels, g = fixed(5)
    teacher = logits + torch.randn(logits.shape, generator=g, dtype=logits.dtype)
    got = method_loss(METHODS["undial"], LossInputs(logits, labels, ref_forget_logits=teacher),
                      UnlearnConfig(method="undial"))["forget"].item()
    # the reference with the ignored positions' teacher logit V-100 given back its beta before the softmax
    undone = teacher.clone()
    undone[:, :-1][labels[:, 1:] == -100, V - 100] += 10.0
    assert got == pytest.approx(ref_undial(logits, undone, labels, 10.0).item(), abs=1e-6)
    assert abs(got - ref_undial(logits, teacher, labels, 10.0).item()) > 1e-4


def ref_ceu(logits, labels, ignore_first_n_answer_tokens):
    # src/trainer/unlearn/ceu.py compute_batch_ceu + cross_entropy_unlearning_loss
    valid_mask = labels != -100
    update_mask = (valid_mask.cumsum(dim=-1) <= ignore_first_n_answer_tokens) & valid_mask
    labels = labels.masked_fill(update_mask, -100)
    shifted_labels = labels[..., 1:].contiguous()
    shifted_logits = logits[..., :-1, :].contiguous()
    valid_mask = shifted_labels != -100
    valid_logits = shifted_logits[valid_mask]
    valid_labels = shifted_labels[valid_mask]
    valid_target_logits = valid_logits.detach().clone()
    valid_target_logits.scatter_(dim=-1, index=valid_labels.unsqueeze(-1), value=float("-inf"))
    valid_target_probabilities = F.softmax(valid_target_logits, dim=-1)
    return F.cross_entropy(input=valid_logits, target=valid_target_probabilities)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_ceu_matches_openunlearning(n):
    logits, labels, _ = fixed(6)
    got = method_loss(METHODS["ceu"], LossInputs(logits, labels), UnlearnConfig(method="ceu",
                                                                               ceu_ignore_first_n_answer_tokens=n))
    assert got["forget"].item() == pytest.approx(ref_ceu(logits, labels, n).item(), abs=1e-6)
    assert set(got) == {"loss", "forget"}   # CEU derives from UnlearnTrainer: no retain term


# ------------------------------------------------------------------------------- pdu

class RefPDU:
    """src/trainer/unlearn/pdu.py: compute_loss's forget term, final_loss_value, the epoch callback."""

    def __init__(self, gamma, alpha, retain_loss_eps, primal_dual, dual_step_size, dual_update_upon,
                 dual_warmup_epochs):
        self.preferences = [gamma, alpha]
        self.retain_loss_eps, self.primal_dual = retain_loss_eps, primal_dual
        self.dual_step_size, self.dual_update_upon = dual_step_size, dual_update_upon
        self.can_update = dual_warmup_epochs == 0
        self.dual_warmup_epochs = dual_warmup_epochs

    def forget_loss(self, logits, labels):
        logits = logits.reshape(-1, logits.size(-1))
        maxLogits = logits.max(dim=-1)[0]
        averageLogits = logits.mean(dim=-1)
        forget_loss = (maxLogits - averageLogits) ** 2
        mask = (labels != -100).reshape(-1)
        return (forget_loss * mask).sum() / mask.sum()

    def final_loss_value(self, losses):
        retain_loss = losses[1] - self.retain_loss_eps
        scaled = torch.tensor(self.preferences, dtype=losses[0].dtype) * torch.hstack([losses[0], retain_loss])
        loss = scaled.sum()
        if self.primal_dual and self.can_update and self.dual_update_upon == "step":
            self.preferences[1] = max(0, self.preferences[1] + self.dual_step_size * retain_loss.item())
        return loss

    def on_epoch_end(self, epoch, mean_retain_loss):
        if epoch >= self.dual_warmup_epochs:
            self.can_update = True
            if self.dual_update_upon == "epoch":
                self.preferences[1] = max(0, self.preferences[1] + self.dual_step_size
                                          * (mean_retain_loss - self.retain_loss_eps))


@pytest.mark.parametrize("upon", ["step", "epoch"])
def test_pdu_matches_openunlearning_over_steps_and_epochs(upon):
    from loku.methods.run import MethodRun

    cfg = UnlearnConfig(method="pdu", pdu_retain_loss_eps=4.0, pdu_dual_update_upon=upon, pdu_dual_warmup_epochs=1,
                        pdu_dual_step_size=0.5, retain_weight=1.0)
    run = MethodRun(METHODS["pdu"], cfg)
    run.setup(None, None, [], [], "cpu")
    ref = RefPDU(1.0, 1.0, 4.0, True, 0.5, upon, 1)
    for epoch in range(1, 4):
        retain_losses = []
        for step in range(3):
            f, fl, g = fixed(10 * epoch + step)
            r, rl, _ = fixed(100 + 10 * epoch + step)
            ours = method_loss(METHODS["pdu"], LossInputs(f, fl, r, rl, state=run.state), cfg)
            from loku.losses import cross_entropy

            ce = cross_entropy(r, rl)
            want = ref.final_loss_value([ref.forget_loss(f, fl), ce])
            assert ours["loss"].item() == pytest.approx(want.item(), abs=1e-6)
            retain_losses.append(float(ce))
        mean = sum(retain_losses) / len(retain_losses)
        run.epoch_end(epoch, lambda: mean)
        ref.on_epoch_end(epoch, mean)
        assert run.state.retain_weight == pytest.approx(ref.preferences[1], abs=1e-9)
    assert ref.preferences[1] != 1.0   # the dual variable moved


def test_pdu_without_its_budget_is_refused():
    from loku.errors import LokuError

    with pytest.raises(LokuError, match="--pdu-retain-loss-eps"):
        UnlearnConfig(method="pdu")


# ------------------------------------------------------------------------------- rmu

def ref_rmu_activation_loss(activation1, activation2, mask):
    # src/trainer/unlearn/rmu.py RMU.compute_activation_loss
    squared_diff = torch.nn.functional.mse_loss(activation1, activation2, reduction="none")
    expanded_mask = mask.unsqueeze(-1).expand_as(squared_diff)
    squared_diff_sum = (squared_diff * expanded_mask).mean(dim=2).sum(dim=(1))
    num_tokens = mask.sum(dim=-1, keepdim=True)
    return (squared_diff_sum / num_tokens).mean()


def test_rmu_matches_openunlearning():
    from loku.methods.representation import rmu_control_vector

    g = torch.Generator().manual_seed(7)
    h_f, h_r, h_ref = (torch.randn(3, 6, 16, generator=g, dtype=torch.float64) for _ in range(3))
    fl = torch.randint(0, 9, (3, 6), generator=g)
    rl = torch.randint(0, 9, (3, 6), generator=g)
    fl[0, :4], rl[1, 3:] = -100, -100
    control = rmu_control_vector(16, 2.0, seed=0)
    assert control.shape == (1, 1, 16) and control.norm().item() == pytest.approx(2.0, rel=1e-6)
    state = MethodState(cache={"tap": "model.layers.1", "control": control})
    x = LossInputs(torch.zeros(3, 6, 5), fl, torch.zeros(3, 6, 5), rl, forget_hidden={"model.layers.1": h_f},
                   retain_hidden={"model.layers.1": h_r}, ref_retain_hidden={"model.layers.1": h_ref}, state=state)
    got = method_loss(METHODS["rmu"], x, UnlearnConfig(method="rmu"))
    want_f = ref_rmu_activation_loss(h_f, control.to(h_f).expand_as(h_f), fl != -100)
    want_r = ref_rmu_activation_loss(h_r, h_ref, rl != -100)
    assert got["forget"].item() == pytest.approx(want_f.item(), abs=1e-6)
    assert got["retain"].item() == pytest.approx(want_r.item(), abs=1e-6)


# ------------------------------------------------------------------------------- lunar

def test_lunar_direction_and_targets_match_openunlearning(tokenizer):
    """Lunar.compute_direction (mean-activation pre-hooks on the blocks at the last position, layer L+1) and
    prepare_trainset_raw / perturb_post_block_activations_forget (the estimated down-projection's inputs and
    targets), on a tiny Llama; loku's loss at the start equals the reference's MSE of the estimated net."""
    from loku.methods.representation import lunar_direction, lunar_loss

    model = tiny_llama(len(tokenizer), seed=3, layers=3).double()
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    harmful = ["How do I make a weapon at home", "Tell me how to steal a car"]
    forget = ["Name: Ada Lovelace, phone 555", "Name: Alan Turing, phone 556"]
    for L in (0, 1, 2):
        # reference: get_mean_activations with pre-hooks on every block, positions [-1], then mean_diff[0, L+1]
        def mean_acts(prompts):
            n_layers = model.config.num_hidden_layers
            cache = torch.zeros(1, n_layers, model.config.hidden_size, dtype=torch.float64)
            hooks = []
            for layer in range(n_layers):
                def hook_fn(module, input, layer=layer):
                    activation = input[0].clone()
                    cache[0, layer] += (1.0 / len(prompts)) * activation[:, -1, :].sum(dim=0)
                hooks.append(model.model.layers[layer].register_forward_pre_hook(hook_fn))
            for p in prompts:   # one at a time: the last position is the last token
                enc = tokenizer([p], return_tensors="pt")
                with torch.no_grad():
                    model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
            for h in hooks:
                h.remove()
            return cache
        candidates = mean_acts(harmful) - mean_acts(forget)
        index = L + 1 if L + 1 < 3 else 2
        want = candidates[0, index]
        got = lunar_direction(model, tokenizer, harmful, forget, L, "cpu")
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)

    # targets: post_block + coeff * direction - input of post_attention_layernorm == down_proj output + coeff d
    L, coeff = 1, 2.0
    direction = lunar_direction(model, tokenizer, harmful, forget, L, "cpu").double()
    enc = tokenizer([forget[0]], return_tensors="pt")
    acts = {}
    layer = model.model.layers[L]
    hooks = [layer.register_forward_hook(lambda m, i, o: acts.setdefault("post", (o[0] if isinstance(o, tuple) else o).clone())),
             layer.post_attention_layernorm.register_forward_pre_hook(lambda m, i: acts.setdefault("pre_ln", i[0].clone())),
             layer.mlp.down_proj.register_forward_pre_hook(lambda m, i: acts.setdefault("pre_down", i[0].clone())),
             layer.mlp.down_proj.register_forward_hook(lambda m, i, o: acts.setdefault("down", o.clone()))]
    with torch.no_grad():
        model(input_ids=enc.input_ids)
    for h in hooks:
        h.remove()
    target = (acts["post"] + coeff * direction - acts["pre_ln"]).squeeze(0)          # reference's forget target
    torch.testing.assert_close(target, (acts["down"] + coeff * direction).squeeze(0), atol=1e-9, rtol=1e-9)
    # the reference's estimated net starts at the model's down_proj weight; its MSE on (input, target)
    estimated = layer.mlp.down_proj.weight.detach()
    ref_mse = nn.MSELoss()(acts["pre_down"].squeeze(0) @ estimated.T, target)
    mask = torch.ones(1, enc.input_ids.shape[1], dtype=torch.bool)
    got = lunar_loss(acts["down"], acts["down"] + coeff * direction, mask)
    assert got.item() == pytest.approx(ref_mse.item(), abs=1e-6)


# ------------------------------------------------------------------------------- gru

class RefGRU:
    """src/trainer/unlearn/gru.py: store_grads, flatten2cpu, the EMA, compute_total_gradient_dot_product,
    orthogonal_component, restore_gradients (GradAscent forget loss), for one optimizer step per call."""

    def __init__(self, gamma_gru):
        self.gamma_gru = gamma_gru
        self.flattened_retain_prev = 0.0
        self.gradient_accum, self.retain_grad = {}, {}
        self.dotps = []

    def store_grads(self, model, loss, typ):
        loss.backward()
        target = self.gradient_accum if typ == "objective" else self.retain_grad
        for name, param in model.named_parameters():
            if param.requires_grad:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                if name not in target:
                    target[name] = torch.zeros_like(param.grad)
                target[name] += param.grad.detach()
        model.zero_grad()

    def step(self, model):
        def flat(d):
            return torch.cat([g.view(-1) for g in d.values()]), [(n, g.shape) for n, g in d.items()]
        flattened_gradient, structure = flat(self.gradient_accum)
        flattened_retain_accumulation, _ = flat(self.retain_grad)
        self.gradient_accum, self.retain_grad = {}, {}
        flattened_retain = self.gamma_gru * flattened_retain_accumulation + (1 - self.gamma_gru) * self.flattened_retain_prev
        self.flattened_retain_prev = flattened_retain
        dotp = (flattened_gradient * flattened_retain).sum().item()
        self.dotps.append(dotp)
        if dotp < 0:
            g1g1 = (flattened_retain * flattened_retain).sum().item()
            flattened_gradient = flattened_gradient - dotp / g1g1 * flattened_retain
        index = 0
        for name, shape in structure:
            size = int(np.prod(shape))
            dict(model.named_parameters())[name].grad = flattened_gradient[index:index + size].view(shape)
            index += size


def test_gru_matches_openunlearning_over_steps():
    from loku.losses import cross_entropy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, V)).double()
    twin = copy.deepcopy(model)
    params = [p for p in model.parameters()]
    cfg = UnlearnConfig(method="gru", gru_ema=0.7)
    from loku.methods.run import MethodRun

    run, ref = MethodRun(METHODS["gru"], cfg), RefGRU(0.7)
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        f_ids, r_ids = torch.randint(0, V, (2, 6), generator=g), torch.randint(0, V, (2, 6), generator=g)
        # loku
        terms = method_loss(METHODS["gru"], LossInputs(model(f_ids), f_ids, model(r_ids), r_ids, state=run.state), cfg)
        run.backward(terms, lambda loss: loss.backward(), params, sync=True)
        # reference
        ref.store_grads(twin, -cross_entropy(twin(f_ids), f_ids), "objective")
        ref.store_grads(twin, cross_entropy(twin(r_ids), r_ids), "retain")
        ref.step(twin)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad.double(), q.grad, atol=1e-6, rtol=1e-6)
        with torch.no_grad():   # the same SGD update on both
            for p, q in zip(model.parameters(), twin.parameters()):
                p -= 0.5 * p.grad
                q -= 0.5 * q.grad
                p.grad = q.grad = None
    # both branches ran: steps whose forget gradient conflicted with the retain average, and steps where it did not
    assert min(ref.dotps) < 0 < max(ref.dotps), ref.dotps


# ------------------------------------------------------------------------------- sibl

def ref_layerwise_magnitude(model, sparsity):
    # src/trainer/sparsity.py SparsityManager._layerwise_magnitude (layers under 10M entries)
    mask_dict = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            mask_dict[name] = torch.ones_like(param.data)
            continue
        if "weight" in name and len(param.shape) >= 2:
            threshold = torch.quantile(param.data.abs().reshape(-1), sparsity)
            mask = (param.data.abs() >= threshold).float()
        else:
            mask = torch.ones_like(param.data)
        mask_dict[name] = mask
    return mask_dict


def hf_loss(model, batch):
    """`model(**batch, labels=...).loss` as Hugging Face computes it (ForCausalLMLoss: shift, mean cross-entropy over
    labels != -100), kept in the model's float64 (transformers upcasts to float32)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


class RefSIBL:
    """src/trainer/unlearn/sibl.py: inner_step, outer_step (with implicit correction, scipy CG), full fine-tuning."""

    def __init__(self, model, mask_dict, s):
        self.model, self.mask_dict, self.s = model, mask_dict, s
        self.lambda_dual = 0.0

    def inner_step(self, batch):
        loss = hf_loss(self.model, batch)
        l1_reg = sum((p.abs() * self.mask_dict[name]).sum() for name, p in self.model.named_parameters()
                     if name in self.mask_dict and p.requires_grad)
        (loss + self.s["gamma"] * l1_reg).backward()
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if param.grad is not None and name in self.mask_dict:
                    param.data.sub_(self.s["eta_in"] * param.grad * self.mask_dict[name])
                param.grad = None

    def compute_hvp(self, loss, params, v):
        grads = torch.autograd.grad(loss, params, create_graph=True, retain_graph=True)
        flat_grad = torch.cat([g.reshape(-1) for g in grads])
        hvp_grads = torch.autograd.grad((flat_grad * v).sum(), params, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hvp_grads])

    def cg(self, hvp_func, b):
        from scipy.sparse.linalg import LinearOperator, cg

        b_np = b.detach().cpu().numpy()

        def matvec(v):
            return hvp_func(torch.from_numpy(v).to(dtype=b.dtype)).detach().cpu().numpy()
        A = LinearOperator((b.numel(), b.numel()), matvec=matvec, dtype=b_np.dtype)
        x_np, _ = cg(A, b_np, maxiter=self.s["cg_iters"], atol=self.s["cg_tol"], rtol=0)
        return torch.from_numpy(x_np).to(dtype=b.dtype)

    def outer_step(self, forget_batch, retain_batch):
        logits = self.model(input_ids=forget_batch["input_ids"], attention_mask=forget_batch["attention_mask"]).logits
        L_fgt = (logits.max(dim=-1)[0] - logits.mean(dim=-1)).mean()
        L_ret = hf_loss(self.model, retain_batch)
        r = L_ret.item() - self.s["epsilon"]
        L_alm = L_fgt + self.lambda_dual * L_ret + 0.5 * self.s["rho"] * r ** 2
        L_alm.backward(retain_graph=True)
        g_alm_dict = {name: param.grad.clone() for name, param in self.model.named_parameters()}
        self.model.zero_grad()
        L_ret_v = hf_loss(self.model, retain_batch)
        R = self.s["gamma"] * sum((p.abs() * self.mask_dict[n]).sum() for n, p in self.model.named_parameters())
        L_inner = L_ret_v + R
        params_list = [p for p in self.model.parameters() if p.requires_grad]
        grads_inner = torch.autograd.grad(L_inner, params_list, create_graph=True, retain_graph=True)
        mask_flat = torch.cat([self.mask_dict[n].reshape(-1) for n, _ in self.model.named_parameters()])
        v = torch.cat([g.reshape(-1) for g in grads_inner]) * mask_flat

        def hvp_func(vec):
            return self.compute_hvp(L_inner, params_list, vec * mask_flat) * mask_flat
        h = self.cg(hvp_func, v)
        correction = self.compute_hvp(L_alm, params_list, h)
        offset = 0
        for name, param in self.model.named_parameters():
            n = param.numel()
            g_alm_dict[name] = g_alm_dict[name] - correction[offset:offset + n].reshape(param.shape)
            offset += n
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.data.sub_(self.s["eta_theta"] * g_alm_dict[name] * self.mask_dict[name])
                param.grad = None
        self.lambda_dual = max(0.0, self.lambda_dual + self.s["rho"] * r)


def test_sibl_matches_openunlearning_full_finetuning(tokenizer):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from loku.data.batches import collate
    from loku.methods.run import MethodRun

    model = tiny_llama(len(tokenizer), seed=4, hidden=16, layers=1).double()
    model.config.tie_word_embeddings = False
    twin = copy.deepcopy(model)
    texts = ["Name: Ada, phone 555 0101", "Name: Alan, phone 555 0102", "Name: Grace, phone 555 0103"]
    batches = [collate([{"input_ids": tokenizer(t)["input_ids"], "labels": tokenizer(t)["input_ids"]} for t in pair],
                       0) for pair in (texts[:2], texts[1:])]
    forget, retain = batches
    s = dict(epsilon=0.1, rho=1.0, K=2, eta_theta=0.05, eta_in=0.05, gamma=1e-4, cg_iters=5, cg_tol=1e-3)
    cfg = UnlearnConfig(method="sibl", lora=False, sibl_sparsity=0.5, **{f"sibl_{k}": v for k, v in s.items()})
    run = MethodRun(METHODS["sibl"], cfg)
    run.setup(model, tokenizer, [], [], "cpu")
    model.requires_grad_(True)
    run.attach(model)
    masks = ref_layerwise_magnitude(twin, 0.5)
    for ours, (name, want) in zip(run.state.cache["masks"], masks.items()):
        assert torch.equal(ours.double(), want.double()), name
    ref = RefSIBL(twin, masks, s)
    params = [p for p in model.parameters()]
    with sdpa_kernel(SDPBackend.MATH):
        for step in range(2):
            run.prestep(model, retain)
            for _ in range(s["K"]):
                ref.inner_step(retain)
            for p, q in zip(model.parameters(), twin.parameters()):
                torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
            with run.capture(model) as hidden:
                f_logits = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
                r_logits = model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
            x = LossInputs(f_logits, forget["labels"], r_logits, retain["labels"], state=run.state)
            terms = method_loss(METHODS["sibl"], x, cfg)
            run.backward(terms, None, params, True)
            ref.outer_step(forget, retain)
            assert run.state.retain_weight == pytest.approx(ref.lambda_dual, abs=1e-9)
            for p, q in zip(model.parameters(), twin.parameters()):
                torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
                assert p.grad is None
    assert ref.lambda_dual > 0


# ------------------------------------------------------------------------------- t3

def ref_mean_pool(hidden_states, attention_mask):
    # src/model/t3.py _mean_pool
    mask = attention_mask.to(device=hidden_states.device, dtype=hidden_states.dtype).unsqueeze(-1)
    token_counts = mask.cumsum(dim=1).clamp_min(1)
    return (hidden_states * mask).cumsum(dim=1) / token_counts


def ref_t3_loss(head, f_hidden, f_mask, f_labels, r_hidden, r_mask, r_labels):
    # src/trainer/unlearn/t3.py compute_loss over T3CausalLM.forward(classifier_only=True)
    def prep(hidden, mask, labels, split):
        pooled = ref_mean_pool(hidden, mask)
        shifted = labels[:, 1:].contiguous()
        safe = shifted.masked_fill(shifted == -100, 0)
        x = pooled[:, :-1, :].reshape(-1, pooled.shape[-1])
        for layer in head.proj[:-1]:
            x = layer(x)
        w = head.proj[-1].weight.index_select(0, safe.reshape(-1))
        logits = (x * w).sum(dim=-1).view(shifted.shape)
        cls_labels = torch.full_like(shifted, int(split == "retain"))
        cls_labels[shifted == -100] = -100
        return logits.flatten(), cls_labels.flatten()
    loss_sum, total = torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for logits, labels in (prep(r_hidden, r_mask, r_labels, "retain"), prep(f_hidden, f_mask, f_labels, "forget")):
        valid = labels != -100
        loss_sum = loss_sum + F.binary_cross_entropy_with_logits(logits[valid], labels[valid].to(logits.dtype),
                                                                 reduction="sum")
        total = total + valid.sum()
    return loss_sum / total.clamp_min(1)


def test_t3_matches_openunlearning():
    from loku.methods.guidance import GuidanceHead, guided_logits

    g = torch.Generator().manual_seed(9)
    torch.manual_seed(0)
    head = GuidanceHead(12, V, 10, 2, "tanh").double()
    fh, rh = torch.randn(2, 6, 12, generator=g, dtype=torch.float64), torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    fm, rm = torch.ones(2, 6, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    fm[1, 4:], rm[0, 3:] = 0, 0
    fl, rl = torch.randint(0, V, (2, 6), generator=g), torch.randint(0, V, (2, 5), generator=g)
    fl[fm == 0], rl[rm == 0], fl[0, :2] = -100, -100, -100
    state = MethodState(cache={"head": head, "tap": "lm_head:input"})
    x = LossInputs(torch.zeros(2, 6, V), fl, torch.zeros(2, 5, V), rl, forget_attention=fm, retain_attention=rm,
                   forget_hidden={"lm_head:input": fh}, retain_hidden={"lm_head:input": rh}, state=state)
    got = method_loss(METHODS["t3"], x, UnlearnConfig(method="t3"))["loss"]
    assert got.item() == pytest.approx(ref_t3_loss(head, fh, fm, fl, rh, rm, rl).item(), abs=1e-6)
    # T3CausalLM._guide_logits
    base, cls = torch.randn(2, 3, V, generator=g, dtype=torch.float64), torch.randn(2, 3, V, generator=g, dtype=torch.float64)
    want = F.log_softmax(base, dim=2) / 0.7 + 1.5 * F.logsigmoid(cls)
    torch.testing.assert_close(guided_logits(base, cls, 1.5, 0.7).double(), want, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------- lmcleaner

def ref_compute_correction(model, params, records, tz, tau, K, batch_loss, mode, damping, historical):
    """src/trainer/unlearn/lmcleaner_core.py compute_correction (step_log mode, epsilon 0): Phase 1-3,
    HistoricalParamContext, hvp_fisher / hvp_ggn."""
    def flat_params():
        return torch.cat([p.detach().reshape(-1) for p in params])

    def set_flat(v):
        offset = 0
        with torch.no_grad():
            for p in params:
                p.copy_(v[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
    v = -records[tz]["u"].clone()
    start, end = tz + 1, min(tz + K, tau - 1)
    active = historical and end >= start
    if active:
        theta_tau = flat_params().clone()
        theta_current = theta_tau.clone()
        for t in range(start, end + 1):
            theta_current -= records[t]["u"]
        for t in range(end + 1, tau):
            theta_current -= records[t]["u"]
        set_flat(theta_current)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for s in range(start, end + 1):
        with torch.enable_grad():
            with sdpa_kernel(SDPBackend.MATH):   # hvp_ggn's forward (second-order gradients)
                loss = batch_loss(s)
            if mode == "fisher":
                grads = torch.autograd.grad(loss, params)
                gvec = torch.cat([x.detach().reshape(-1) for x in grads])
                hvp = gvec * torch.dot(gvec, v)
            else:
                grads = torch.autograd.grad(loss, params, create_graph=True)
                v_list, offset = [], 0
                for p in params:
                    v_list.append(v[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
                gv = sum((gg * vp).sum() for gg, vp in zip(grads, v_list))
                hvp = torch.cat([x.reshape(-1) for x in torch.autograd.grad(gv, params)])
        v = v - records[s]["eta"] * hvp
        if damping > 0:
            v = v - records[s]["eta"] * damping * v
        if active:
            theta_current += records[s]["u"]
            set_flat(theta_current)
    if active:
        set_flat(theta_tau)
    return v


@pytest.mark.parametrize("mode,historical,damping", [("fisher", True, 0.0), ("exact", True, 0.0),
                                                     ("fisher", False, 0.1)])
def test_lmcleaner_matches_openunlearning(tokenizer, tmp_path, mode, historical, damping):
    from loku.data.batches import collate
    from loku.losses import cross_entropy
    from loku.methods.editing import Trajectory, TrajectoryWriter
    from loku.methods.run import MethodRun

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    texts = [f"Record {i}: the code is {100 + 7 * i}" for i in range(6)]
    examples = [{"text": t} for t in texts]
    model = tiny_llama(len(tokenizer), seed=5, hidden=16, layers=1)
    names = [n for n, _ in model.named_parameters()]
    writer = TrajectoryWriter(tmp_path / "traj", examples, names)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    order = [[0, 1], [2, 3], [4, 5], [1, 2], [3, 4], [5, 0]]
    feats = [{"input_ids": tokenizer(t)["input_ids"], "labels": tokenizer(t)["input_ids"]} for t in texts]
    for idx in order:
        b = collate([feats[i] for i in idx], tokenizer.pad_token_id)
        before = writer.snapshot(model)
        loss = cross_entropy(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        writer.step(model, before, 0.5, idx)
    writer.close()
    traj = Trajectory(tmp_path / "traj")
    records = [{"u": traj.update(t).double(), "eta": s["lr"]} for t, s in enumerate(traj.steps)]
    forget = [examples[2]]                       # seen at steps 1 and 3
    assert traj.steps_with(forget) == [1, 3]
    twin = copy.deepcopy(model).double()
    tparams = [dict(twin.named_parameters())[n] for n in names]

    def ref_loss(s):
        return hf_loss(twin, collate([feats[i] for i in order[s]], tokenizer.pad_token_id))
    for tz in (1, 3):   # _apply_unlearning: each correction applied before the next is computed
        v = ref_compute_correction(twin, tparams, records, tz, len(order), 3, ref_loss, mode, damping, historical)
        with torch.no_grad():
            offset = 0
            for p in tparams:
                p.add_(v[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
    ours = copy.deepcopy(model).double()
    cfg = UnlearnConfig(method="lmcleaner", lmcleaner_trajectory=str(tmp_path / "traj"), lmcleaner_K=3,
                        lmcleaner_hessian_mode=mode, lmcleaner_historical=historical, lmcleaner_damping=damping,
                        max_length=64)
    run = MethodRun(METHODS["lmcleaner"], cfg)
    run.setup(ours, tokenizer, forget, [], "cpu")
    assert run.state.values["corrected_steps"] == 2
    moved = False
    for (n, p), q, p0 in zip(ours.named_parameters(), twin.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=n)
        moved = moved or not torch.allclose(p, p0.double())
    assert moved
