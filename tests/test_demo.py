"""The demo pipeline end to end on a tiny model (the real run, `make demo`, uses SmolLM2-135M), and its
leak measurement on a model that parrots known text."""

import json

import pytest
import torch

from rich.console import Console

from loku.demo import TIE, DemoConfig, forget, leak, leaks, make_groups, measure, prompt, revealed_others, run_demo
from loku.models import load_model
from loku.data.records import make_records, record_text
from loku.errors import LokuError


class Parrot(torch.nn.Module):
    """A 'model' whose greedy continuation of every prompt is the token ids `tail` (cut at max_new_tokens)."""

    def __init__(self, tail: list[int]):
        super().__init__()
        self.tail = tail

    def generate(self, input_ids, attention_mask=None, max_new_tokens=0, **kw):
        tail = torch.tensor(self.tail[:max_new_tokens]).repeat(input_ids.shape[0], 1)
        return torch.cat([input_ids, tail], dim=1)


def _rest(tokenizer, r) -> list[int]:
    return tokenizer(record_text(r)[len(prompt(r)):], add_special_tokens=False)["input_ids"]


def test_leak_score_counts_revealed_fields(tokenizer):
    """A 'model' that always continues with one record's exact text leaks all 5 of its fields, none of others'."""
    rec, other = make_records(2, seed=9)
    tokenizer.pad_token = tokenizer.eos_token
    tail = _rest(tokenizer, rec)
    scores, texts = leaks(Parrot(tail), tokenizer, [rec, other], max_new_tokens=len(tail))
    assert scores == [1.0, 0.0]


def test_leak_generation_reaches_the_last_field(tokenizer):
    """By default the continuation covers the whole record, so its last field (the account) can be revealed;
    cut 6 tokens short, it cannot."""
    tokenizer.pad_token = tokenizer.eos_token
    recs = make_records(6, seed=3)
    longest = max(recs, key=lambda r: len(_rest(tokenizer, r)))
    parrot = Parrot(_rest(tokenizer, longest))
    assert leaks(parrot, tokenizer, [longest])[0] == [1.0]
    short = len(_rest(tokenizer, longest)) - 6
    assert leaks(parrot, tokenizer, [longest], max_new_tokens=short)[0] == [0.8]


def test_demo_people_share_no_first_or_last_name():
    """With --distinct-names the demo's 24 people (three groups and the strangers) never share a first or a last
    name while the word lists last, and a shorter draw is the start of a longer one (the strangers follow the
    groups); without it the draw is the default one."""
    from loku.demo import everyone, strangers

    for seed in (0, 1, 7):
        cfg = DemoConfig(seed=seed, distinct_names=True)
        people = everyone(make_groups(cfg)) + strangers(cfg)
        assert people == make_records(24, seed=seed, distinct_names=True)
        assert everyone(make_groups(DemoConfig(seed=seed))) == make_records(18, seed=seed)   # the default draw
        firsts, lasts = zip(*(r.name.split() for r in people))
        assert len(set(firsts)) == len(set(lasts)) == 24
        assert make_records(18, seed=seed, distinct_names=True) == people[:18]
        more = make_records(30, seed=seed, distinct_names=True)   # past the lists: names repeat, people do not
        assert more[:24] == people and len({r.name for r in more}) == 30


def test_revealed_others_names_only_identifying_fields():
    a, b, c = make_records(3, seed=11)
    texts = [record_text(b)[len(prompt(b)):],                      # b's whole record under a's name
             f" 1 Nowhere Lane. Works at {a.employer}.",           # a shared employer names nobody
             f" {c.address}. Phone {c.phone}"]                    # c's own fields
    assert revealed_others(texts, [a, b, c], [a, b, c]) == [[b.name], [], []]


def test_value_examples_split_the_record_at_its_private_values():
    """One prompt/completion pair per private value: the prompt is the record up to the value, the completion
    the value (with its leading space), so the words between values are in no completion."""
    from loku.demo import PRIVATE, value_examples

    for r in make_records(20, seed=4):
        exs, text = value_examples(r), record_text(r)
        assert [e["answer"] for e in exs] == [" " + getattr(r, f) for f in PRIVATE]
        for e in exs:
            assert text.startswith(e["question"] + e["answer"]) and not e["question"].endswith(" ")
        assert text == exs[-1]["question"] + exs[-1]["answer"] + "."


def test_value_features_score_the_tokens_the_per_value_examples_learn(tokenizer):
    """Each record in one feature scores exactly the tokens that its value examples, tokenized one by one in the
    `continuation` format (what the unlearning trains on), carry loss on."""
    from loku.data.qa import format_qa
    from loku.demo import value_examples, value_features

    for r, f in zip(recs := make_records(8, seed=5), value_features(tokenizer, recs)):
        assert f["input_ids"] == tokenizer(record_text(r))["input_ids"]
        learned = []
        for e in value_examples(r):
            ex = format_qa(tokenizer, e["question"], e["answer"], 256, "continuation")
            assert ex["input_ids"] == f["input_ids"][:len(ex["input_ids"])]
            learned += [i for i, label in enumerate(ex["labels"]) if label != -100]
        assert learned == [i for i, label in enumerate(f["labels"]) if label != -100]
        assert all(f["labels"][i] == f["input_ids"][i] for i in learned)


def test_tokenized_examples_are_taken_as_they_are_and_checked_for_overlap(tokenizer):
    """The unlearning receives `value_features` as tokenized examples: kept as given (cut to max_length), and
    one given as both forget and retain counts as shared."""
    from loku.data.retain import shared_examples
    from loku.data.text import tokenize_examples
    from loku.demo import value_features

    feats = value_features(tokenizer, make_records(3, seed=6))
    assert tokenize_examples(feats, tokenizer, 256) == feats
    n = len(feats[0]["input_ids"]) - 3
    assert tokenize_examples(feats[:1], tokenizer, n) == [{k: v[:n] for k, v in feats[0].items()}]
    assert shared_examples(feats, feats[1:] + [{"text": record_text(make_records(1)[0])}]) == 2
    for bad in ({"input_ids": feats[0]["input_ids"]}, {**feats[0], "labels": feats[0]["labels"][:-1]}):
        with pytest.raises(LokuError, match="input_ids but .* labels: give labels of the same length"):
            tokenize_examples([bad], tokenizer, 256)


def test_batched_memorization_is_exact_memorization_over_the_values(tokenizer):
    """The demo's one padded pass gives, per record, the share of its value tokens that are the model's argmax
    given the true prefix, as computed example by example."""
    from conftest import tiny_llama
    from loku.data.qa import format_qa
    from loku.demo import memorization, value_examples

    model = tiny_llama(len(tokenizer))
    tokenizer.pad_token = tokenizer.eos_token
    recs = make_records(5, seed=2)
    expect = []
    for r in recs:
        hits = total = 0
        for e in value_examples(r):
            ex = format_qa(tokenizer, e["question"], e["answer"], 256, "continuation")
            with torch.no_grad():
                pred = model(torch.tensor([ex["input_ids"]])).logits[0, :-1].argmax(-1)
            labels = torch.tensor(ex["labels"][1:])
            hits += int(((pred == labels) & (labels != -100)).sum())
            total += int((labels != -100).sum())
        expect.append(hits / total)
    assert memorization(model, tokenizer, recs) == pytest.approx(expect, abs=1e-12)


def test_general_paragraphs_are_single_sentences_apart_from_the_perplexity_text():
    """The general text mixed into the leak (and kept by the unlearning) is first sentences of the built-in
    paragraphs, first one per article, all different and none of them the demo's perplexity text."""
    from loku.data.retain import PER_ARTICLE, builtin_retain
    from loku.demo import GENERAL_TEXT, general_paragraphs

    paragraphs = [e["text"] for e in builtin_retain()]
    texts = general_paragraphs(10_000)
    assert len(texts) == len(set(texts)) == len(paragraphs)
    for t in texts:
        assert any(p.startswith(t) for p in paragraphs) and t[-1] in ".!?"
        assert not any(t in g or g in t for g in GENERAL_TEXT)
    first = general_paragraphs(16)
    assert first == texts[:16] and all(paragraphs[i * PER_ARTICLE].startswith(t) for i, t in enumerate(first))
    assert "Little Gidding is the fourth and final poem of T. S. Eliot's" in " ".join(first)  # not cut at "T."


def test_leak_trains_only_the_mlp_blocks(tokenizer):
    from conftest import tiny_llama
    from loku.demo import train_only

    model = tiny_llama(len(tokenizer))
    train_only(model, "mlp")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and trained == {n for n, _ in model.named_parameters() if ".mlp." in n}
    train_only(model, "all")
    assert all(p.requires_grad for p in model.parameters())


def test_unlearning_adapters_go_on_the_layers_the_leak_trained(tokenizer):
    """--unlearn-modules mlp: the LoRA targets are the MLP blocks' linear layers, the same weights `train_only`
    lets the leak train."""
    from conftest import tiny_llama
    from loku.demo import mlp_linear_names, train_only
    from loku.lora import plan_lora

    model = tiny_llama(len(tokenizer))
    names = mlp_linear_names(model)
    assert names == ["gate_proj", "up_proj", "down_proj"]
    train_only(model, "mlp")
    trained = {n.removesuffix(".weight") for n, p in model.named_parameters() if p.requires_grad}
    assert set(plan_lora(model, names, 2, 4.0).module_names) == trained


@pytest.fixture(scope="module")
def quick_report(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    # The tiny model learns too little through its MLPs alone in a few epochs: it trains whole (leak and unlearning),
    # on records only, for 20 epochs; the unlearning keeps the retain records by cross-entropy alone (the real demo's
    # held+kl also holds the leaked model's distribution, which the tiny model's small gap cannot afford), with the
    # same 16 general sentences every step (the real demo streams 8 a step from 64), without strangers (its 6).
    cfg = DemoConfig(out=str(out), model=str(tiny_model_dir), leak_lr=3e-3, leak_modules="all", unlearn_lr=3e-3,
                     ihl_retain_loss="ce", n_strangers=0,
                     unlearn_modules="all", retain_general=16, retain_pool=16, mixed_precision="no",
                     **{**DemoConfig.quick_overrides(), "leak_general": 0, "leak_max_epochs": 20,
                        "unlearn_max_epochs": 4})
    return run_demo(cfg), out


def test_quick_demo_leaks_then_forgets_and_keeps_the_rest(quick_report):
    """The leak fine-tune makes the known people (not the unseen) memorized; unlearning then brings the forget
    people below what the leaked model knew of them and puts the retain people ahead of them. (The tiny model
    learns mostly the values' formats, which all people share, so the gap it can open is small: 0.019 -> 0.054.)"""
    report, _ = quick_report
    base, leaked, after = report["base"], report["leaked"], report["unlearned"]
    for g in ("forget", "retain"):
        assert leaked[f"{g}_memorization"] > base[f"{g}_memorization"] + 0.2
        assert leaked[f"{g}_memorization"] > leaked["unseen_memorization"] + 0.1
    assert after["forget_memorization"] < leaked["forget_memorization"]
    gap = lambda row: row["retain_memorization"] - row["forget_memorization"]   # noqa: E731
    assert gap(after) > gap(leaked) + 0.03
    assert report["leak_epochs"] >= 1 and report["unlearn_epochs"] >= 1
    assert [c["phase"] for c in report["curves"]].count("leak") == report["leak_epochs"]
    unlearn_curves = [c for c in report["curves"] if c["phase"] == "unlearn"]
    # an epoch's fields are generated only once its memorization is at the never-seen level (the cheap half)
    assert all(("forget_leak" in c) == (c["forget"] <= report["leaked"]["unseen_memorization"]) for c in unlearn_curves)
    assert all(0.0 <= c["forget_leak"] <= 1.0 for c in unlearn_curves if "forget_leak" in c)
    # the stop rule: the first epoch whose forgotten people reveal no field beyond the target and whose generations
    # name nobody else, while the retain people still reveal the leak's target, ends the run; judged on the
    # generations the table reports (everyone in one batch)
    target, kept = report["config"]["forget_target"], report["config"]["leak_target"]
    ppl_limit = report["config"]["ppl_limit"] * report["leaked"]["general_ppl"]
    done = [("forget_leak" in c and c["forget_leak"] <= target + TIE and c["forget_reveals_others"] == 0
             and c["retain_leak"] >= kept - TIE and c["general_ppl"] <= ppl_limit) for c in unlearn_curves]
    assert not any(done[:-1]) and (done[-1] or report["unlearn_epochs"] == report["config"]["unlearn_max_epochs"])
    if "forget_leak" in unlearn_curves[-1]:   # the last check is the table's column (the same model)
        assert unlearn_curves[-1]["forget_reveals_others"] == after["forget_reveals_others"]
        assert unlearn_curves[-1]["forget_leak"] == after["forget_leak"]
        assert unlearn_curves[-1]["retain_leak"] == after["retain_leak"]
    for s in report["samples"]:
        assert s["prompt"].endswith("lives at") and isinstance(s["reveals_others"], list)
    assert after["forget_reveals_others"] == sum(bool(s["reveals_others"]) for s in report["samples"])
    assert 0 <= after["unseen_reveals_others"] <= len(report["samples"])
    # where the time went: every part measured, none negative, together the whole run
    parts = report["seconds"]
    assert set(parts) == {"load", "measure", "leak training", "leak checks", "unlearn training", "unlearn checks",
                          "other"}
    assert all(v >= 0 for v in parts.values()) and parts["leak checks"] > 0 and parts["unlearn checks"] > 0
    assert sum(parts.values()) == pytest.approx(report["total_seconds"], abs=0.5)
    assert parts["leak training"] + parts["leak checks"] == pytest.approx(report["leak_seconds"], abs=0.2)


def test_the_unlearning_ends_with_the_column_its_last_check_measured(tiny_model_dir):
    """The table takes the unlearning's last epoch check as its column (when that check generated) instead of
    measuring the model again: the same numbers and generations as measuring the model the unlearning ends with."""
    cfg = DemoConfig(model=str(tiny_model_dir), n_forget=2, n_retain=2, n_unseen=2, n_strangers=0, leak_general=0,
                     leak_max_epochs=2, leak_lr=3e-3, leak_modules="all", unlearn_max_epochs=2, unlearn_lr=3e-3,
                     ihl_retain_loss="ce", unlearn_modules="all", retain_general=2, mixed_precision="no")
    model, tokenizer = load_model(cfg.model)
    groups, curves, console = make_groups(cfg), [], Console(quiet=True)
    leak(model, tokenizer, groups, cfg, curves, console)
    leaked = measure(model, tokenizer, groups)[0]
    result, _, unlearned = forget(model, tokenizer, groups, cfg, curves, console,
                                  {**leaked, "unseen_memorization": 1.0}, None)   # every check generates
    assert unlearned is not None and unlearned == measure(result.model, tokenizer, groups)
    assert unlearned[0]["forget_memorization"] != leaked["forget_memorization"]   # it did train


def test_quick_demo_writes_report_plot_and_adapter(quick_report):
    report, out = quick_report
    assert json.loads((out / "report.json").read_text())["unlearn_epochs"] == report["unlearn_epochs"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "unlearned" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "manifest.json").is_file()
    assert report["retain"] == "records"


@pytest.mark.slow   # the real demo: SmolLM2-135M, over 10 minutes of CPU time
def test_real_demo_keeps_the_model_healthy_and_forgets(tmp_path):
    """Issue 14.6's bars on `loku demo` as `make demo` runs it: the leak fine-tune keeps general-text perplexity
    within 1.5x of the pretrained model and leaks >= 80% of both groups' fields; after unlearning <= 5% of the
    forgotten people's fields leak, >= 80% of the retain people's still do, perplexity stays within 1.1x of the
    leaked model and no generation for a forgotten person reveals someone else's record."""
    report = run_demo(DemoConfig(out=str(tmp_path / "run")))
    base, leaked, after = report["base"], report["leaked"], report["unlearned"]
    assert leaked["general_ppl"] <= 1.5 * base["general_ppl"]
    # shares of fields are means of k/5: 24 of 30 fields is 0.7999999999999999 (TIE: the demo's own tolerance)
    assert leaked["forget_leak"] >= 0.8 - TIE and leaked["retain_leak"] >= 0.8 - TIE
    assert after["forget_leak"] <= 0.05 + TIE and after["retain_leak"] >= 0.8 - TIE
    assert after["general_ppl"] <= 1.1 * leaked["general_ppl"]
    assert after["forget_reveals_others"] == 0
