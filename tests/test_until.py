"""`loku unlearn --until forgotten --unseen U` (loku.audit.stop): the never-seen level is the model's own, before
training (TDEC's thresholds, computed independently here); the run stops at the first epoch where the forget set
is below it, and says so in metrics.jsonl, until_forgotten.json and the CLI's last line; the membership-AUC
condition gates the stop; question/answer data uses EM and ES; bad input in test_bad_input.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import run_cli, write_csv
from loku import UnlearnConfig, unlearn
from loku.audit.stop import AUC_ATTACKS, BEST, UntilForgotten, strongest
from loku.config import UNTIL_AUC_ATTACKS
from loku.metrics.extraction import memorization_metrics
from loku.metrics.membership import attack_scores, auc
from loku.tdec import compute_thresholds, tokenize_sequences
from loku.tdec.thresholds import below

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def sets(memorized, tmp_path_factory):
    model, tok, a, b = memorized
    d = tmp_path_factory.mktemp("until")
    return {"forget": write_csv(d / "forget.csv", a[:8]), "unseen": write_csv(d / "unseen.csv", b[:8]),
            "a": a[:8], "b": b[:8], "dir": d}


def _cfg(sets, **kw):
    base = dict(forget=sets["forget"], unseen=sets["unseen"], until="forgotten", method="ga", init="default",
                lora_rank=8, lr=1e-2, batch_size=8, epochs=30, max_length=MAX_TOKENS)
    return UnlearnConfig(**{**base, **kw})


def test_the_auc_attacks_are_the_configs_choices():
    assert UNTIL_AUC_ATTACKS == (BEST, *AUC_ATTACKS)
    assert strongest({"loss": 0.6, "zlib": 0.2, "min_k": 0.75}) == "zlib"   # 0.3 from 0.5 beats 0.25


def test_level_is_tdecs_thresholds_of_the_model_before_training(memorized, sets):
    model, tok, *_ = memorized
    cfg = _cfg(sets)
    rule = UntilForgotten.read(cfg).start(cfg, model, tok, log=None)
    unseen = tokenize_sequences(sets["b"], tok, max_tokens=MAX_TOKENS)
    th = compute_thresholds(model, unseen)["thresholds"]   # loku tdec thresholds' own computation
    assert rule.level["ma"] == pytest.approx(th.ma) and rule.level["el"] == pytest.approx(th.el)
    assert rule.records == [] and rule.before["ma"] > th.ma + 0.2   # memorized, unlike unseen text
    assert rule.before["forgotten"] is False


def test_run_stops_at_the_first_epoch_below_the_never_seen_level(memorized, sets, tmp_path):
    model, tok, *_ = memorized
    out = tmp_path / "run"
    cfg = _cfg(sets, out=str(out))
    forget = tokenize_sequences(sets["a"], tok, max_tokens=MAX_TOKENS)
    measured = []   # each epoch's MA and EL10 of the forget set, measured independently of the rule

    def measure(epoch, m):
        got = memorization_metrics(m, torch.tensor(forget.ids), 10)
        measured.append({"epoch": epoch, "ma": got["ma"].mean().item(), "el10": got["el"].mean().item()})

    res = unlearn(cfg, copy.deepcopy(model), tok, callbacks=[measure], progress=False)
    assert res.stopped_early and 1 < res.epochs_run < cfg.epochs
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [m["epoch"] for m in measured] == list(range(1, res.epochs_run + 1))
    th = compute_thresholds(model, tokenize_sequences(sets["b"], tok, max_tokens=MAX_TOKENS))["thresholds"]
    for e, m in zip(epochs, measured):   # the logged values are the epoch's model's, and the level is constant
        assert e["ma"] == pytest.approx(m["ma"], abs=1e-6) and e["el10"] == pytest.approx(m["el10"], abs=1e-6)
        assert e["ma_unseen"] == pytest.approx(th.ma) and e["el10_unseen"] == pytest.approx(th.el)
    holds = [th.forgotten(el=m["el10"], ma=m["ma"]) for m in measured]   # TDEC's own check on the measured values
    assert holds == [e["forgotten"] for e in epochs] == [False] * (len(epochs) - 1) + [True]   # stops at the first
    final = memorization_metrics(res.model.eval(), torch.tensor(forget.ids), 10)   # the returned model is the last
    assert epochs[-1]["ma"] == pytest.approx(final["ma"].mean().item(), abs=1e-6)
    summary = json.loads((out / "until_forgotten.json").read_text())
    assert summary["epochs_to_forget"] == res.epochs_run and summary["forgotten"]
    assert summary["level"] == {"ma": epochs[0]["ma_unseen"], "el10": epochs[0]["el10_unseen"]}
    assert summary["before"]["ma"] > summary["level"]["ma"] and len(summary["epochs"]) == res.epochs_run
    assert "until_forgotten.json" in json.loads((out / "manifest.json").read_text())["files"]


def test_auc_margin_delays_the_stop_until_membership_inference_fails(memorized, sets, tmp_path):
    """Gradient ascent brings MA and EL10 under the never-seen level while every attack still tells the forget set
    from the unseen one (AUC near 1); with a margin the run goes on until the strongest attack's AUC is within it
    (and stops before it overshoots below 0.5 - the margin)."""
    model, tok, *_ = memorized
    plain = unlearn(_cfg(sets, epochs=12), copy.deepcopy(model), tok, progress=False)
    out = tmp_path / "auc"
    res = unlearn(_cfg(sets, epochs=12, until_auc_margin=0.2, out=str(out)), copy.deepcopy(model), tok,
                  progress=False)
    epochs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["kind"] == "epoch"]
    assert res.stopped_early and res.epochs_run > plain.epochs_run
    for e in epochs:
        aucs = {a: e[f"auc_{a}"] for a in AUC_ATTACKS}
        assert e["auc_attack"] == strongest(aucs) and e["auc"] == aucs[e["auc_attack"]]
        tdec = below(e["ma"], e["ma_unseen"]) and below(e["el10"], e["el10_unseen"])
        assert e["forgotten"] == (tdec and all(abs(v - 0.5) <= 0.2 for v in aucs.values()))
    assert [e["forgotten"] for e in epochs] == [False] * (len(epochs) - 1) + [True]
    assert abs(epochs[plain.epochs_run - 1]["auc"] - 0.5) > 0.2   # where the plain rule stopped, AUC still gave it away
    summary = json.loads((out / "until_forgotten.json").read_text())
    assert summary["epochs_to_forget"] == res.epochs_run and "within 0.2 of 0.5" in summary["rule"]


def test_cap_reached_is_reported_not_forgotten(memorized, sets, tmp_path):
    model, tok, *_ = memorized
    out = tmp_path / "cap"
    res = unlearn(_cfg(sets, epochs=1, out=str(out)), copy.deepcopy(model), tok, progress=False)
    summary = json.loads((out / "until_forgotten.json").read_text())
    assert not res.stopped_early and res.epochs_run == 1
    assert summary["forgotten"] is False and summary["epochs_to_forget"] is None
    assert summary["final"]["forgotten"] is False and summary["final"]["ma"] >= summary["level"]["ma"]


def test_cli_reports_the_verdict(memorized, sets, tmp_path, capsys):
    model, tok, *_ = memorized
    (tmp_path / "m").mkdir()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = ["unlearn", "--model", tmp_path / "m", "--forget", sets["forget"], "--unseen", sets["unseen"],
            "--until", "forgotten", "--method", "ga", "--init", "default", "--lr", "1e-2", "--batch-size", "8",
            "--max-length", str(MAX_TOKENS)]
    code, out, err = run_cli([*args, "--epochs", "1", "--out", tmp_path / "one"], capsys)
    assert code == 0, err
    assert "not forgotten within 1 epochs (the cap): MA" in out and "never-seen" in out
    code, out, err = run_cli([*args, "--epochs", "30", "--out", tmp_path / "all"], capsys)
    assert code == 0, err
    epochs = json.loads((tmp_path / "all" / "until_forgotten.json").read_text())["epochs_to_forget"]
    assert f"forgotten at epoch {epochs}: MA" in out


def test_auc_condition_gates_the_stop(memorized, sets):
    """On the memorized model every attack separates forget from unseen (AUC 1): a margin of 0.4 fails, the
    largest margin (0.5) always passes; the AUCs are membership.attack_scores' on the same texts."""
    model, tok, *_ = memorized
    cfg = _cfg(sets, until_auc_margin=0.4)
    rule = UntilForgotten.read(cfg).start(cfg, model, tok, log=None)
    rule.level = {"ma": 2.0, "el": 2.0}   # MA/EL always pass: only the AUC decides
    got = rule(1, model)
    scores_a = attack_scores(model, tok, sets["a"], attacks=AUC_ATTACKS)
    scores_b = attack_scores(model, tok, sets["b"], attacks=AUC_ATTACKS)
    for a in AUC_ATTACKS:
        assert got[f"auc_{a}"] == pytest.approx(auc(scores_a[a], scores_b[a]))
    assert got["auc_attack"] == strongest({a: got[f"auc_{a}"] for a in AUC_ATTACKS})
    assert got["auc"] == got[f"auc_{got['auc_attack']}"] and abs(got["auc"] - 0.5) > 0.4
    assert got["forgotten"] is False and got["stop"] is False
    rule.auc_margin = 0.5
    assert rule(2, model)["forgotten"] is True and rule.epochs_to_forget == 2
    rule.auc_margin, rule.auc_attack = 0.4, "loss"
    one = rule(3, model)
    assert one["auc_attack"] == "loss" and one["forgotten"] == (abs(one["auc_loss"] - 0.5) <= 0.4)


def test_question_answer_data_uses_em_and_es(memorized, tmp_path):
    model, tok, *_ = memorized
    qa = [{"question": f"Where does person {i} live?", "answer": f"At {10 + i} Elm Street."} for i in range(6)]
    f, u = tmp_path / "f.json", tmp_path / "u.json"
    f.write_text(json.dumps(qa[:3]))
    u.write_text(json.dumps(qa[3:]))
    cfg = UnlearnConfig(forget=str(f), unseen=str(u), until="forgotten", method="ga", max_length=64)
    rule = UntilForgotten.read(cfg).start(cfg, model, tok, log=None)
    assert set(rule.level) == {"em", "es"}
    got = rule(1, model)
    assert {"em", "es", "em_unseen", "es_unseen", "forgotten"} <= set(got) and "ma" not in got
    assert got["forgotten"] == (below(got["em"], got["em_unseen"]) and below(got["es"], got["es_unseen"]))


def test_rule_refuses_sets_of_different_kinds(memorized, sets, tmp_path):
    from loku.errors import LokuError

    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([{"question": "Where?", "answer": "Here."}]))
    with pytest.raises(LokuError, match="holds question/answer pairs but the forget set holds plain text"):
        UntilForgotten.read(_cfg(sets, unseen=str(qa)))
    with pytest.raises(LokuError, match="unknown membership attack 'lss'"):
        _cfg(sets, until_auc_margin=0.1, until_auc_attack="lss")
