"""Relearning and paraphrased-probe attacks: the input model stays bit-identical, relearning really relearns,
probes are deterministic and keep the scored part."""


import pytest
import torch

from conftest import build_tokenizer, record_texts, tiny_llama
from loku.attacks.paraphrase import TEXT_KINDS, perturb, prefix_probes, question_probes, read_field, retokenized
from loku.attacks.relearn import RelearnSettings, check_steps, relearn, relearning_curve, split_forget, step_examples
from loku.errors import LokuError
from loku.metrics.forward import text_features
from loku.metrics.membership import feature_scores
from loku.models import ensure_pad_token


@pytest.fixture(scope="module")
def tok():
    return ensure_pad_token(build_tokenizer())


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_relearning_leaves_the_input_untouched_and_relearns(tok):
    model = tiny_llama(len(tok), seed=2)
    texts = record_texts(6)
    feats = text_features(tok, texts, max_tokens=40)
    before = _state(model)
    settings = RelearnSettings(lr=5e-3, batch_size=2, seed=0)
    loss0 = -sum(feature_scores(model, feats, tok.pad_token_id, attacks=["loss"])["loss"])
    attacked = relearn(model, feats, tok.pad_token_id, 8, settings)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k   # bit-identical
    assert attacked is not model and not any(p.requires_grad for p in attacked.parameters())
    loss8 = -sum(feature_scores(attacked, feats, tok.pad_token_id, attacks=["loss"])["loss"])
    assert loss8 < 0.9 * loss0   # 8 steps of fine-tuning lowered the loss on what it trained on
    again = relearn(model, feats, tok.pad_token_id, 8, settings)
    assert all(torch.equal(a, b) for a, b in zip(attacked.state_dict().values(), again.state_dict().values()))
    zero = relearn(model, feats, tok.pad_token_id, 0, settings)
    assert all(torch.equal(zero.state_dict()[k], before[k]) for k in before)


def test_relearning_a_peft_model_trains_the_merged_weights(tok):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(len(tok), seed=2), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    before = _state(model)
    feats = text_features(tok, record_texts(4), max_tokens=30)
    attacked = relearn(model, feats, tok.pad_token_id, 3, RelearnSettings(lr=1e-3, batch_size=2))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not hasattr(attacked, "peft_config") and "lora_A" not in str(list(attacked.state_dict()))


def test_relearning_curve_points_in_order(tok):
    model = tiny_llama(len(tok), seed=2)
    feats = text_features(tok, record_texts(4), max_tokens=30)
    seen = []
    points = relearning_curve(model, feats, tok.pad_token_id,
                              measure=lambda m: {"w": float(m.lm_head.weight.detach().double().sum())},
                              steps=[4, 0, 2], settings=RelearnSettings(lr=1e-2, batch_size=2), log=seen.append)
    assert [p["steps"] for p in points] == [0, 2, 4]
    assert points[0]["w"] == pytest.approx(float(model.lm_head.weight.detach().double().sum()))
    assert points[1]["w"] != points[2]["w"]


def test_step_examples_and_split():
    feats = [{"i": i} for i in range(5)]
    ex = step_examples(feats, 3, 4, seed=0)
    assert len(ex) == 12 and sorted(e["i"] for e in ex[:5]) == list(range(5))   # each once per pass
    a, b = split_forget(10, 0.5, seed=1)
    assert len(a) == 5 and sorted(a + b) == list(range(10)) and split_forget(10, 0.5, seed=1) == (a, b)
    assert split_forget(2, 0.9, 0) == ([0], [1]) or split_forget(2, 0.9, 0) == ([1], [0])
    with pytest.raises(LokuError, match="at least 2"):
        split_forget(1)
    with pytest.raises(LokuError, match=">= 0"):
        check_steps([-1, 5])
    assert check_steps(["10", 0, 10]) == (0, 10)


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_perturbations_are_seeded_and_light(kind, tok):
    import random

    text = "Jane Roe lives at 12 Elm St, Springfield. Phone 555-0100; email jane@example.org"
    a = perturb(text, kind, random.Random("1/x/0"))
    assert a == perturb(text, kind, random.Random("1/x/0"))
    if kind == "retokenize":
        assert a == text
        ids = retokenized(tok, text, random.Random(3))
        assert tok.decode(ids) == text and ids != tok(text, add_special_tokens=False)["input_ids"]
    else:
        assert a != text and abs(len(a) - len(text)) <= 0.5 * len(text)
        assert a.lower().replace(" ", "") != text.lower().replace(" ", "") or kind in ("case", "whitespace")


def test_prefix_probes_keep_the_continuation(tok):
    seqs = [tok(t, add_special_tokens=False)["input_ids"][:40] for t in record_texts(5)]
    exact = prefix_probes(tok, seqs, "exact", prefix_fraction=0.5)
    assert [f["input_ids"] for f in exact] == seqs
    for kind in TEXT_KINDS:
        probes = prefix_probes(tok, seqs, kind, prefix_fraction=0.5, seed=4)
        assert probes == prefix_probes(tok, seqs, kind, prefix_fraction=0.5, seed=4)
        for x, f in zip(seqs, probes):
            scored = [t for t in f["labels"] if t != -100]
            assert scored == x[20:] and f["input_ids"][-20:] == x[20:]
        assert any(f["input_ids"] != x for f, x in zip(probes, seqs))
    with pytest.raises(LokuError, match="did you mean 'case'"):
        prefix_probes(tok, seqs, "cases")


def test_question_probes_and_read_field(tmp_path, tok):
    import json

    rows = [{"question": "Who is A?", "answer": "A is a writer.", "paraphrased_question": "Tell me who A is."},
            {"question": "Where is B?", "answer": "B lives in Rome."}]
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(rows))
    para = read_field(path, "paraphrased_question")
    assert para == ["Tell me who A is.", None]
    probes = question_probes(tok, rows, max_length=64, paraphrased=para)
    from loku.data.qa import format_qa

    assert probes[0] == format_qa(tok, "Tell me who A is.", "A is a writer.", 64)
    assert probes[1] == format_qa(tok, "Where is B?", "B lives in Rome.", 64)


def test_tofu_paraphrased_questions_are_read():
    from conftest import need_shared

    path = need_shared("tofu", "forget01_perturbed.json")
    para = read_field(path, "paraphrased_question")
    assert len(para) == 40 and all(isinstance(p, str) and p for p in para)
