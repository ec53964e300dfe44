"""`loku audit` end to end on tiny models: what it sees, what it writes, resume, bad inputs."""

import json

import numpy as np
import pytest
import torch

from conftest import build_tokenizer, memorize, record_texts, run_cli, tiny_llama, write_csv
from loku.audit import AuditConfig, run_audit
from loku.audit.verdict import ABOVE, BELOW, INDISTINGUISHABLE, _auc, compare_auc, compare_means, recovery, verdict
from loku.errors import LokuError
from loku.models import ensure_pad_token


@pytest.fixture(scope="module")
def audit_files(tmp_path_factory):
    """mem/: memorized the 8 forget records; fresh/: never trained; forget/unseen/related CSVs."""
    d = tmp_path_factory.mktemp("audit")
    tok = ensure_pad_token(build_tokenizer())
    texts = record_texts(24)
    forget, unseen, related = texts[:8], texts[8:16], texts[16:20]
    for name, model in (("mem", memorize(tiny_llama(len(tok)), tok, forget, steps=100)),
                        ("fresh", tiny_llama(len(tok), seed=1)), ("fresh2", tiny_llama(len(tok), seed=2))):
        model.save_pretrained(d / name)
        tok.save_pretrained(d / name)
    return {"dir": d, "tok": tok, "forget": write_csv(d / "forget.csv", forget),
            "unseen": write_csv(d / "unseen.csv", unseen), "related": write_csv(d / "related.csv", related)}


def _cfg(f, out, **kw):
    base = dict(model=str(f["dir"] / "mem"), forget=f["forget"], unseen=f["unseen"], max_tokens=40, bootstrap=200,
                out=str(out))
    return AuditConfig(**{**base, **kw})


def _lines(report, condition):
    return {ln["metric"]: ln for ln in report["verdicts"] if ln["condition"] == condition
            and ln["probe"] == "forget set"}


def test_audit_sees_a_memorized_forget_set(audit_files, tmp_path):
    out = tmp_path / "a"
    report = run_audit(_cfg(audit_files, out), log=lambda s: None)
    base = _lines(report, "before attacks")
    assert set(base) == {"ma", "el", "es", "em", "loss", "zlib", "min_k", "min_k_plus_plus"}
    assert all(ln["verdict"] == ABOVE for ln in base.values()), base
    assert base["loss"]["forget"] == 1.0 and base["ma"]["forget"] == base["em"]["forget"]
    for name in ("audit.json", "audit.md", "audit.png", "manifest.json"):
        assert (out / name).is_file()
    saved = json.loads((out / "audit.json").read_text())
    per = saved["unlearned"]["sets"]["forget"]["per_example"]
    assert len(per["min_k"]) == 8 and len(saved["unlearned"]["sets"]["unseen"]["per_example"]["el"]) == 8
    md = (out / "audit.md").read_text()
    assert "distinguishable from never-seen on 8 of 8 measures" in md and "| before attacks | forget set | EL10 |" in md


def test_el_shares_the_teacher_forced_pass(audit_files, capsys):
    """With EL_n, ES/EM/membership come from the pass that gives EL_n's cache: the same values as the separate
    teacher-forced pass of an audit without EL_n (to rounding: that pass batches rows by length, unpadded;
    MA exactly), and EL_n/MA those of the metric alone, row by row; also with the decode batches on worker
    threads."""
    from loku.audit import build_set, measure_set
    from loku.audit.measure import Settings
    from loku.audit.sets import read_examples
    from loku.metrics.extraction import memorization_metrics
    from loku.models import load_model

    model, tok = load_model(str(audit_files["dir"] / "mem"))
    s = build_set("forget", audit_files["forget"], read_examples(audit_files["forget"], "text", "forget"), tok,
                  max_tokens=200, n=10)  # uncut: rows of several lengths
    st = Settings(pad_id=tok.pad_token_id, batch_size=3, decode_batch_size=4)
    passes = []  # forward calls over whole rows (decode steps feed one token)
    hook = model.register_forward_hook(lambda m, args, kw, out: passes.append(kw["input_ids"].shape[1] > 1),
                                       with_kwargs=True)
    with_el = measure_set(model, s, st)["per_example"]
    hook.remove()
    shown = capsys.readouterr().out   # EL_n's decoding shows a bar of its tokens (outside a terminal: its end)
    assert "EL10 forget: decoding" in shown and "tokens" in shown
    lengths = [len(ids) for ids in s.sequences]
    assert sum(passes) == sum(-(-lengths.count(n) // 3) for n in set(lengths))  # one pass per batch, no other
    without = measure_set(model, s, Settings(**{**st.__dict__, "el": False}))["per_example"]
    assert "decoding" not in capsys.readouterr().out   # no decoding, no bar
    assert set(with_el) == set(without) | {"el"}
    for name in set(without) - {"ma"}:
        assert with_el[name] == pytest.approx(without[name], rel=1e-5, abs=1e-6), name
    assert with_el["ma"] == without["ma"]  # k / (T-1) from either pass's argmax
    for i, ids in enumerate(s.sequences):
        alone = memorization_metrics(model, torch.tensor([ids]), 10)
        assert (with_el["ma"][i], with_el["el"][i]) == (alone["ma"].item(), alone["el"].item())
    assert len({len(ids) for ids in s.sequences}) > 1  # several length groups
    assert 0 < min(with_el["el"]) and max(with_el["el"]) == 1.0
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # decode batches (of 4 branches) on 2 worker threads
    try:
        on_workers = measure_set(model, s, st)["per_example"]
    finally:
        torch.set_num_threads(threads)
    assert (on_workers["ma"], on_workers["el"]) == (with_el["ma"], with_el["el"])
    for name in set(without) - {"ma"}:
        assert on_workers[name] == pytest.approx(with_el[name], rel=1e-5, abs=1e-6), name


def test_audit_attacks_and_recovery(audit_files, tmp_path):
    from loku.models import load_model

    f = audit_files
    model, tok = load_model(str(f["dir"] / "fresh"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(f, tmp_path / "b", model=str(f["dir"] / "fresh"), original=str(f["dir"] / "mem"),
               reference=str(f["dir"] / "fresh2"), attacks=["quantize", "paraphrase", "relearn"],
               quantizers=["int8", "nf4"], relearn_steps=[0, 6], relearn_lr=5e-3, relearn_data=f["related"],
               paraphrase_kinds=["retokenize", "case"])
    report = run_audit(cfg, model=model, tokenizer=tok, log=lambda s: None)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # input untouched
    assert _lines(report, "before attacks")["reference"]["verdict"] in (INDISTINGUISHABLE, ABOVE, BELOW)
    orig = _lines(report, "original model (before unlearning)")
    assert all(ln["verdict"] == ABOVE for ln in orig.values())
    a = report["attacks"]
    assert [(q["quantizer"], q["mode"]) for q in a["quantize"]] == [("int8", "merged"), ("nf4", "merged")]
    assert [p["kind"] for p in a["paraphrase"]["kinds"]] == ["retokenize", "case"]
    assert set(a["paraphrase"]["kinds"][0]["result"]["sets"]["forget"]["per_example"]) == \
        {"es", "em", "loss", "zlib", "min_k", "min_k_plus_plus", "reference"}   # probes: no MA/EL
    part = a["relearn"]["forget_part"]
    assert [p["steps"] for p in part] == [0, 6] and len(a["relearn"]["related"]) == 2
    held = set(a["relearn"]["forget_split"]["held_out_rows"])
    assert held and not held & set(a["relearn"]["forget_split"]["relearned_rows"])
    # recovery is (attacked - unlearned) / (original - unlearned) of the forget-side values
    u = report["unlearned"]["compare"]["forget"]["metrics"]["ma"]["forget"]
    o = report["original"]["compare"]["forget"]["metrics"]["ma"]["forget"]
    x = part[1]["result"]["compare"]["forget"]["metrics"]["ma"]["forget"]
    assert part[1]["recovery"]["ma"] == pytest.approx((x - u) / (o - u))
    assert part[1]["recovery"]["ma"] > 0.05   # relearning half the forget set brought some of it back
    assert (tmp_path / "b" / "audit.png").stat().st_size > 10_000


def test_resume_reuses_finished_parts(audit_files, tmp_path):
    out = tmp_path / "c"
    cfg = _cfg(audit_files, out, attacks=["quantize"], quantizers=["int8", "int4"], el="none")
    first = run_audit(cfg, log=lambda s: None)
    for name in ("audit.json", "audit.md", "audit.png", "manifest.json", "parts/quantize-int4-merged.json"):
        (out / name).unlink()   # as if killed while quantizing to int4
    logs = []
    second = run_audit(_cfg(audit_files, out, attacks=["quantize"], quantizers=["int8", "int4"], el="none",
                            resume=True), log=logs.append)
    assert any("unlearned: reused" in s for s in logs) and any("quantize-int8-merged: reused" in s for s in logs)
    assert not any("int4-merged: reused" in s for s in logs)
    assert second["verdicts"] == first["verdicts"]
    with pytest.raises(LokuError, match="other settings"):
        run_audit(_cfg(audit_files, out, attacks=["quantize"], quantizers=["nf4"], el="none", resume=True))


def test_qa_audit_with_paraphrased_questions(tmp_path):
    tok = ensure_pad_token(build_tokenizer())
    texts = record_texts(12)
    rows = [{"question": f"What do you know about {t.split(' lives')[0]}?", "answer": t} for t in texts]
    forget = [dict(r, paraphrased_question=r["question"].replace("What do you know about", "Tell me about"))
              for r in rows[:6]]
    (tmp_path / "forget.json").write_text(json.dumps(forget))
    (tmp_path / "holdout.json").write_text(json.dumps(rows[6:]))
    model = tiny_llama(len(tok))
    cfg = AuditConfig(model="unused", forget=str(tmp_path / "forget.json"), unseen=str(tmp_path / "holdout.json"),
                      max_tokens=128, attacks=["paraphrase"], bootstrap=100, out=str(tmp_path / "out"))
    report = run_audit(cfg, model=model, tokenizer=tok, log=lambda s: None)
    assert set(report["unlearned"]["sets"]["forget"]["per_example"]) == \
        {"es", "em", "loss", "zlib", "min_k", "min_k_plus_plus"}   # QA: no MA / EL
    kinds = report["attacks"]["paraphrase"]["kinds"]
    assert [k["kind"] for k in kinds] == ["paraphrased_question"]
    assert any(ln["condition"] == "paraphrased question" for ln in report["verdicts"])


def test_cli_audit_writes_the_report(audit_files, tmp_path, capsys):
    f = audit_files
    out = tmp_path / "cli"
    code, stdout, err = run_cli(["audit", "--model", f["dir"] / "mem", "--forget", f["forget"], "--unseen",
                                 f["unseen"], "--max-tokens", 40, "--bootstrap", 100, "--el", "none", "--attacks",
                                 "quantize", "--quantizers", "nf4", "--out", out], capsys)
    assert code == 0, err
    report = json.loads((out / "audit.json").read_text())
    assert report["config"]["el"] == "none" and report["config"]["quantizers"] == ["nf4"]
    assert "el" not in report["unlearned"]["sets"]["forget"]["per_example"]
    assert "wrote" in stdout


def _adapter_for_another_model(path, vocab):
    from peft import LoraConfig, get_peft_model

    other = get_peft_model(tiny_llama(vocab, hidden=32), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    other.save_pretrained(path)
    return path


@pytest.mark.parametrize("case", ["empty unseen", "other tokenizer", "adapter for another model", "missing forget",
                                  "qa against text", "unknown attack", "no unseen"])
def test_bad_inputs_one_line_exit_2_nothing_written(audit_files, tmp_path, capsys, case):
    f = audit_files
    out = tmp_path / "out"
    args = {"--model": f["dir"] / "mem", "--forget": f["forget"], "--unseen": f["unseen"], "--out": out,
            "--max-tokens": 40}
    if case == "empty unseen":
        args["--unseen"] = write_csv(tmp_path / "empty.csv", [])
        want = "holds no examples"
    elif case == "other tokenizer":
        other = tmp_path / "other"
        tok = ensure_pad_token(build_tokenizer(384))
        tiny_llama(len(tok)).save_pretrained(other)
        tok.save_pretrained(other)
        args["--original"] = other
        want = "different tokenizer"
    elif case == "adapter for another model":
        args["--adapter"] = _adapter_for_another_model(tmp_path / "adapter", len(f["tok"]))
        want = "adapter .* is for another model"
    elif case == "missing forget":
        args["--forget"] = tmp_path / "nope.csv"
        want = "does not exist"
    elif case == "qa against text":
        (tmp_path / "qa.json").write_text(json.dumps([{"question": "Q?", "answer": "A."}]))
        args["--forget"] = tmp_path / "qa.json"
        want = "same kind"
    elif case == "unknown attack":
        args["--attacks"] = "quantise"
        want = "did you mean 'quantize'"
    else:
        del args["--unseen"]
        want = "no --unseen given"
    capsys.readouterr()   # drop what building the inputs printed
    code, stdout, err = run_cli(["audit", *[x for kv in args.items() for x in kv]], capsys)
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    import re

    assert re.search(want, lines[0]), lines[0]
    assert not out.exists()


def test_auc_of_the_bootstrap_is_sklearns_and_verdicts():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 1, 30), rng.normal(0, 1, 25)
    a[:3] = b[:3]   # ties count half in both
    assert _auc(a, b) == pytest.approx(roc_auc_score([1] * 30 + [0] * 25, np.concatenate([a, b])), abs=1e-12)
    line = compare_auc(list(a), list(b), n_resamples=500)
    assert line["interval"][0] < line["auc"] < line["interval"][1]
    assert verdict(0.01, 0.2) == ABOVE and verdict(-0.2, -0.01) == BELOW and verdict(-0.1, 0.1) == INDISTINGUISHABLE
    assert verdict(0.01, 0.2, tolerance=0.02) == INDISTINGUISHABLE
    same = compare_means([0.5] * 10, [0.5] * 10)
    assert same["interval"] == [0.0, 0.0] and same["verdict"] == INDISTINGUISHABLE
    far = compare_means(list(rng.normal(1, 0.1, 20)), list(rng.normal(0, 0.1, 20)))
    assert far["verdict"] == ABOVE and far["interval"][0] > 0.8
    assert recovery(0.5, 0.2, 0.8) == pytest.approx(0.5) and recovery(0.5, 0.2, 0.205) is None
    assert recovery(0.5, None, 0.8) is None


def test_adapter_audit_quantizes_merged_and_base(audit_files, tmp_path):
    from peft import LoraConfig, get_peft_model

    from loku.models import load_model

    f = audit_files
    model, tok = load_model(str(f["dir"] / "fresh"))
    lora = get_peft_model(load_model(str(f["dir"] / "fresh"))[0], LoraConfig(r=2, lora_alpha=4,
                                                                              target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    lora.save_pretrained(tmp_path / "adapter")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(f, tmp_path / "out", model=str(f["dir"] / "fresh"), adapter=str(tmp_path / "adapter"),
               attacks=["quantize"], quantizers=["nf4"], el="none")
    report = run_audit(cfg, model=model, tokenizer=tok, log=lambda s: None)
    assert [q["mode"] for q in report["attacks"]["quantize"]] == ["merged", "base"]
    assert set(model.state_dict()) == set(before) and all(torch.equal(v, before[k])
                                                          for k, v in model.state_dict().items())
    merged, base = (q["result"]["sets"]["forget"]["per_example"]["loss"] for q in report["attacks"]["quantize"])
    assert merged != base   # the adapter in full precision on a quantized base is another model
