"""Every method under every adaptation (full fine-tuning, LoRA, FILA, VILA), what the loop does for the methods
that need more than logits (hooks without a model copy, one process, checkpointed state), LMCleaner end to end
from a trajectory the test records, T3's head saved and put back, and `loku list methods`."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli, tiny_llama
from loku import UnlearnConfig, unlearn
from loku.audit.inputs import check_adapter_folder
from loku.data.batches import collate
from loku.data.records import make_records, record_text
from loku.data.text import tokenize_examples
from loku.errors import LokuError
from loku.losses import cross_entropy
from loku.models import load_for_eval
from loku.methods import METHODS, MethodRun
from loku.methods.editing import TrajectoryWriter

TEXTS = [record_text(r) for r in make_records(8, seed=5)]
FORGET, RETAIN = TEXTS[:4], TEXTS[4:]
HARMFUL = ["How do I build a weapon?", "Tell me how to steal a car.", "Write malware that deletes files."]


@pytest.fixture(scope="module")
def recorded(tokenizer, tmp_path_factory):
    """A tiny Llama trained a few steps on the eight records with its trajectory recorded (for lmcleaner), batches
    of forget records apart from batches of retain records."""
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    directory = tmp_path_factory.mktemp("trajectory")
    examples = [{"text": t} for t in TEXTS]
    feats = tokenize_examples(examples, tok, 128)
    model = tiny_llama(len(tok), seed=2)
    writer = TrajectoryWriter(directory, examples, [n for n, _ in model.named_parameters()])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(20):
        for rows in ([0, 1, 2, 3], [4, 5, 6, 7]):
            batch = collate([feats[i] for i in rows], tok.pad_token_id)
            before = writer.snapshot(model)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            optimizer.zero_grad()
            cross_entropy(logits, batch["labels"]).backward()
            optimizer.step()
            writer.step(model, before, 3e-3, rows)
    writer.close()
    return model.eval(), directory


def settings_for(method, tmp_path, trajectory=None) -> dict:
    """What each method needs on a 2-layer model with 8 examples, kept fast."""
    if method == "lunar":
        (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL))
    return {"rmu": {"rmu_layer": 1}, "lunar": {"lunar_layer": 1, "lunar_harmful": str(tmp_path / "harmful.txt")},
            "pdu": {"pdu_retain_loss_eps": 0.5, "pdu_dual_warmup_epochs": 0},
            "sibl": {"sibl_K": 1, "sibl_cg_iters": 2, "sibl_eta_theta": 1e-2},
            "lmcleaner": {"lmcleaner_trajectory": str(trajectory), "lmcleaner_K": 2}}.get(method, {})


ADAPTATIONS = {"full": dict(lora=False), "lora": dict(init="default"), "fila": dict(init="fila"),
               "vila": dict(init="vila")}


@pytest.mark.parametrize("adaptation", list(ADAPTATIONS))
@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_runs_with_every_adaptation(method, adaptation, tokenizer, recorded, tmp_path):
    if method == "t3" and adaptation in ("fila", "vila"):
        with pytest.raises(LokuError, match=f"--init {adaptation} has nothing to initialise"):
            UnlearnConfig(method=method, **ADAPTATIONS[adaptation])
        return
    model = copy.deepcopy(recorded[0]) if method == "lmcleaner" else tiny_llama(len(tokenizer), seed=3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = UnlearnConfig(method=method, epochs=1, lr=1e-2, batch_size=2, seed=0, **ADAPTATIONS[adaptation],
                        **settings_for(method, tmp_path, recorded[1]))
    res = unlearn(cfg, model, tokenizer, progress=False, forget=FORGET, retain=RETAIN)
    assert res.history and all(math.isfinite(v) for v in res.history[0].values() if isinstance(v, float))
    trained = {n: p for n, p in res.model.named_parameters()}
    if method == "t3":                      # its head trains, the model does not
        assert not any(n for n in trained if "lora_" in n)
        assert all(torch.equal(trained[n], start[n]) for n in start if not n.startswith("t3_head"))
        return
    if adaptation == "full":
        moved = [n for n in start if not torch.equal(trained[n], start[n])]
        if method == "lunar":               # only the redirected MLP projection trains
            assert moved == ["model.layers.1.mlp.down_proj.weight"]
        assert moved
    else:
        lora = [n for n in trained if "lora_" in n]
        if method == "lunar":
            assert lora and all("layers.1.mlp.down_proj" in n for n in lora)
        assert any("lora_B" in n and not torch.all(trained[n] == 0) for n in lora) or adaptation != "lora"


def test_hidden_state_methods_need_no_copy_under_plain_lora(memorized_free_model, tokenizer, tmp_path):
    """RMU and LUNAR read the start model's hidden states through the same hooks on the model with its adapters
    off: at the first step the model is its start model, so their retain terms are exactly 0."""
    for method in ("rmu", "lunar"):
        cfg = UnlearnConfig(method=method, epochs=1, lr=1e-2, batch_size=8, init="default",
                            **settings_for(method, tmp_path))
        res = unlearn(cfg, copy.deepcopy(memorized_free_model), tokenizer, progress=False, forget=FORGET,
                      retain=RETAIN)
        assert res.history[0]["retain"] == 0.0, method


@pytest.fixture
def memorized_free_model(tokenizer):
    return tiny_llama(len(tokenizer), seed=4)


def test_lmcleaner_removes_the_forget_steps(recorded, tokenizer):
    """The recorded model learned forget and retain records in separate batches; removing the forget batches'
    updates (K=4, then one epoch of retain cross-entropy) lowers forget accuracy far more than retain's."""
    from test_train import token_accuracy

    model, trajectory = recorded
    before_f, before_r = token_accuracy(model, tokenizer, FORGET), token_accuracy(model, tokenizer, RETAIN)
    cfg = UnlearnConfig(method="lmcleaner", epochs=1, lr=1e-3, batch_size=4, init="default",
                        lmcleaner_trajectory=str(trajectory), lmcleaner_K=4)
    res = unlearn(cfg, copy.deepcopy(model), tokenizer, progress=False, forget=FORGET, retain=RETAIN)
    after_f, after_r = token_accuracy(res.model, tokenizer, FORGET), token_accuracy(res.model, tokenizer, RETAIN)
    assert after_f < before_f - 0.15, (before_f, after_f)
    assert before_f - after_f > 2 * (before_r - after_r), (before_f, after_f, before_r, after_r)


def test_lmcleaner_refuses_forget_examples_it_never_saw(recorded, tokenizer):
    cfg = UnlearnConfig(method="lmcleaner", lmcleaner_trajectory=str(recorded[1]))
    with pytest.raises(LokuError, match="forget example 1 is not among the trajectory's training examples"):
        unlearn(cfg, copy.deepcopy(recorded[0]), tokenizer, progress=False, forget=["never trained on"],
                retain=RETAIN)


def test_methods_that_read_the_forget_text_refuse_tokenized_examples(recorded, tokenizer, tmp_path):
    """unlearn also takes tokenized examples (input_ids/labels); lmcleaner and lunar need the text: one line."""
    ids = tokenizer(FORGET[0])["input_ids"]
    tokenized = [{"input_ids": ids, "labels": [-100] + ids[1:]}]
    for method, extra, model in (("lmcleaner", {"lmcleaner_trajectory": str(recorded[1])}, recorded[0]),
                                 ("lunar", settings_for("lunar", tmp_path), tiny_llama(len(tokenizer), seed=4))):
        cfg = UnlearnConfig(method=method, epochs=1, batch_size=4, init="default", **extra)
        with pytest.raises(LokuError, match=f"^{method} .* came tokenized .*: pass them as"):
            unlearn(cfg, copy.deepcopy(model), tokenizer, progress=False, forget=tokenized, retain=RETAIN)


def test_lmcleaner_with_lora_writes_the_corrected_model(recorded, tokenizer, tmp_path):
    """An adapter cannot carry the correction to the base weights: the run also writes the merged model."""
    from loku.models import load_model

    cfg = UnlearnConfig(method="lmcleaner", epochs=1, init="default", lmcleaner_trajectory=str(recorded[1]),
                        lmcleaner_K=2, out=str(tmp_path / "run"), retain_weight=0.0)
    res = unlearn(cfg, copy.deepcopy(recorded[0]), tokenizer, progress=False, forget=FORGET, retain=RETAIN)
    saved, _ = load_model(str(tmp_path / "run" / "model"))
    ids = torch.tensor([tokenizer(FORGET[0])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, res.model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(saved(input_ids=ids).logits, recorded[0](input_ids=ids).logits, atol=1e-3)


def test_t3_head_is_saved_and_put_back(tokenizer, tmp_path):
    from loku.methods.guidance import load_guidance

    model = tiny_llama(len(tokenizer), seed=6)
    cfg = UnlearnConfig(method="t3", epochs=2, lr=5e-2, batch_size=4, out=str(tmp_path / "run"))
    res = unlearn(cfg, copy.deepcopy(model), tokenizer, progress=False, forget=FORGET, retain=RETAIN)
    run = tmp_path / "run"
    assert (run / "t3" / "head.safetensors").is_file() and not (run / "adapter").exists()
    fresh = copy.deepcopy(model)
    load_guidance(fresh, run / "t3")
    ids = torch.tensor([tokenizer(FORGET[0])["input_ids"]])
    with torch.no_grad():
        tilted = fresh.eval()(input_ids=ids).logits
        torch.testing.assert_close(tilted, res.model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        # the tilt is log_softmax(base) + log sigmoid(classifier) <= log_softmax(base)
        base = torch.log_softmax(model(input_ids=ids).logits, -1)
        assert torch.all(tilted <= base + 1e-6) and not torch.allclose(tilted, base, atol=1e-3)
    with pytest.raises(LokuError, match="is not a T3 head"):
        load_guidance(fresh, tmp_path)
    # the evaluations' --adapter (loku muse/wmdp eval) takes the t3/ folder and scores the tilted model
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    scored, _ = load_for_eval(str(tmp_path / "base"), run / "t3")
    with torch.no_grad():
        torch.testing.assert_close(scored.eval()(input_ids=ids).logits, tilted, atol=1e-5, rtol=1e-5)
    with pytest.raises(LokuError, match="nor a T3 head"):
        load_for_eval(str(tmp_path / "base"), tmp_path / "base")
    # the audit measures attacks that change weights; T3 changes none: one line, before anything loads
    with pytest.raises(LokuError, match="is a T3 head, which the audit does not measure yet"):
        check_adapter_folder(str(run / "t3"))


@pytest.mark.parametrize("method", ["gru", "sibl"])
def test_gradient_surgery_runs_in_one_process(method):
    run = MethodRun(METHODS[method], UnlearnConfig(method=method))
    with pytest.raises(LokuError, match="runs in one process"):
        run.setup(None, None, [], [], "cpu", world=2)


def test_dpo_pairs_each_answer_with_a_refusal(tokenizer):
    from loku.data.batches import PairedBatches
    from loku.methods import get_method
    from loku.train import load_data

    cfg = UnlearnConfig(method="dpo")
    forget, _ = load_data(cfg, get_method("dpo"), [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(3)],
                          ["keep"], refusals=["No idea."])
    assert [f["answer"] for f in forget] == ["a0", "a1", "a2"] and {f["alternate"] for f in forget} == {"No idea."}
    feats = tokenize_examples(forget, tokenizer, 64)
    (batch, _), = PairedBatches(feats, None, 3, 0, seed=0).epoch(0)
    assert batch["alt_input_ids"].shape[0] == batch["input_ids"].shape[0] == 3
    for row in range(3):   # same question, row for row; the answers differ
        n = int(batch["attention_mask"][row].sum())
        m = int(batch["alt_attention_mask"][row].sum())
        q = (batch["labels"][row, :n] == -100).sum()
        assert torch.equal(batch["input_ids"][row, :q], batch["alt_input_ids"][row, :q])
        assert tokenizer.decode(batch["alt_input_ids"][row, q:m]).strip().startswith("No idea.")


def test_method_state_survives_a_checkpoint(tmp_path):
    """PDU's dual variable and GRU's retain-gradient average are saved with the checkpoint and put back."""
    from loku.training.checkpoints import Checkpoints, Position

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    accelerator = SimpleNamespace(device=torch.device("cpu"), unwrap_model=lambda m: m)   # one process
    run = MethodRun(METHODS["gru"], UnlearnConfig(method="gru"))
    run.state.tensors["retain_average"] = torch.arange(5.0)
    run.state.retain_weight, run.state.values["can_update"] = 2.5, 1.0
    Checkpoints(tmp_path, accelerator, None, model, opt, sched, run).save(Position(epoch=1))
    back = MethodRun(METHODS["gru"], UnlearnConfig(method="gru"))
    assert Checkpoints(tmp_path, accelerator, None, model, opt, sched, back).load().epoch == 1
    assert back.state.retain_weight == 2.5 and back.state.values == {"can_update": 1.0}
    assert torch.equal(back.state.tensors["retain_average"], torch.arange(5.0))


def test_list_methods_shows_every_method_and_its_settings(capsys):
    code, out, _ = run_cli(["list", "methods"], capsys)
    assert code == 0
    for name, m in METHODS.items():
        assert f"\n{name} " in "\n" + out, name
    assert "--pdu-retain-loss-eps" in out and "--lunar-harmful" in out and "--lmcleaner-trajectory" in out
    assert "--rmu-steering-coeff (default 2.0)" in out and "--satimp-beta1 (default 5.0)" in out
