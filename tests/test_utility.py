"""Utility evaluation (TDEC protocol): prompt formats, batched scorers against one-at-a-time references,
a rigged model whose accuracy is known, error messages, and the real task files when ../shared is present."""

import json
import math

import pytest
import torch
from conftest import need_shared, tiny_gpt2, tiny_llama

from loku.data.eval_tasks import (
    Completion, Dialogue, MultipleChoice, arc_item, copa_item, dialogue_item, hellaswag_item, lambada_item,
    load_task, mathqa_item, normalize_reply, piqa_item, pubmedqa_item, winogrande_item,
)
from loku.errors import LokuError
from loku.metrics.dialogue import greedy_replies, unigram_f1
from loku.metrics.perplexity import sequence_nll, token_weighted_perplexity
from loku.metrics.reasoning import completion_results, encode_pair, multiple_choice_results, score_continuations
from loku.metrics.utility import evaluate_utility, resolve_tasks



PAIRS = [("The quick brown fox", " jumps over the lazy dog."), ("Question: Who wrote the book? Answer:", " The author"),
         ("Machine", " learning models memorize some of their training data."), ("", " Paris"),
         ("Greta Eriksen lives at 12 Harbor Road, Eastvale.", " Phone"), ("def main():", "\n    return 0\n")]


def slow_logprob(model, tokenizer, context, continuation, max_length=512):
    """The obviously-correct reference: one pair, no padding, no batching."""
    ids, n = encode_pair(tokenizer, context, continuation, max_length)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0, -n:].float(), -1)
    target = torch.tensor(ids[-n:])
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


# ------------------------------------------------------------------ prompt formats (Jang et al.)

def test_prompt_formats_follow_jang_et_al():
    assert piqa_item({"goal": "Open a jar", "sol1": "twist", "sol2": "kick", "label": 1}) == \
        MultipleChoice("Open a jar", (" twist", " kick"), 1)
    assert hellaswag_item({"ctx": "A man sits. he", "endings": ["a", "b", "c", "d"], "label": "2"}).gold == 2
    arc = {"question": "Q?", "choices": {"text": ["w", "x", "y", "z"], "label": ["1", "2", "3", "4"]}, "answerKey": "3"}
    assert arc_item(arc) == MultipleChoice("Q?", (" w", " x", " y", " z"), 2)
    assert arc_item({**arc, "choices": {"text": ["w", "x", "y"], "label": ["A", "B", "C"]}}) is None
    assert copa_item({"premise": "It rained.", "choice1": "A.", "choice2": "B.", "question": "effect",
                      "label": 0}) == MultipleChoice("It rained.", (" A.", " B."), 0)
    wino = winogrande_item({"sentence": "Sarah beat Maria so _ got the cases.", "option1": "Sarah",
                            "option2": "Maria", "answer": "2"})
    assert wino == MultipleChoice("Sarah beat Maria so", (" Sarah got the cases.", " Maria got the cases."), 1)
    math_item = mathqa_item({"problem": "2 + 2 = ?", "options": "a ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) 1,200",
                             "correct": "d"})
    assert math_item == MultipleChoice("2 + 2 = ?", ("1", "2", "3", "4", "1,200"), 3)  # no leading space
    pub = pubmedqa_item({"abstract": "Ab.", "question": "Q?", "final_decision": "maybe"})
    assert pub == MultipleChoice("Context: Ab.\nQuestion: Q?\nAnswer:", (" yes", " maybe", " no"), 1)
    assert lambada_item({"text": "He saw the  old glen"}) == Completion("He saw the  old", " glen")


def test_dialogue_prompt_and_reply_normalisation():
    assert normalize_reply("i think so . what about you") == "I think so. What about you."
    assert normalize_reply("hello , how are you ?") == "Hello, how are you?"
    assert dialogue_item(["hi", "hello there", "how are you", "fine"]) == Dialogue(
        "User 1: Hi.\nUser 2: Hello there.\nUser 1: How are you.\nUser 2:", "Fine.")
    assert dialogue_item(["hi", "yo"]).prompt == "User 1: Hi.\nUser 2:"
    assert dialogue_item(["a", "b", "c"]).prompt.endswith("User 2: B.\nUser 1:")


def test_unigram_f1_hand_computed():
    assert unigram_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)       # P=1, R=2/3
    assert unigram_f1("Cat, cat!", "cat") == pytest.approx(2 / 3)                  # repeats count once
    assert unigram_f1("", "") == 0.0 and unigram_f1("dog", "cat") == 0.0
    assert unigram_f1("The end.", "end") == 1.0


# ------------------------------------------------------------------ batched scorers vs references

@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_batched_option_scores_equal_one_at_a_time(tokenizer, builder):
    model = builder(len(tokenizer))
    for max_length in (512, 12):  # 12 forces left truncation of the longer pairs
        got = score_continuations(model, tokenizer, PAIRS, batch_size=4, max_length=max_length)
        for (ctx, cont), g in zip(PAIRS, got):
            logprob, greedy = slow_logprob(model, tokenizer, ctx, cont, max_length)
            assert g.logprob == pytest.approx(logprob, rel=1e-6, abs=1e-5)   # float32 sums of up to ~230 nats
            assert g.greedy == greedy


def test_perplexity_equals_per_sequence_loop(tokenizer):
    model = tiny_llama(len(tokenizer))
    texts = [p[0] + p[1] for p in PAIRS] + ["x"]
    got = sequence_nll(model, tokenizer, texts, batch_size=3, max_length=10)
    nll = tokens = 0.0
    for text, g in zip(texts, got):
        ids = tokenizer(text).input_ids[:10]
        ref = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item() * (len(ids) - 1) if len(ids) > 1 else 0
        assert g["tokens"] == len(ids) - 1 and g["nll"] == pytest.approx(ref, rel=1e-5, abs=1e-4)
        nll, tokens = nll + ref, tokens + len(ids) - 1
    assert token_weighted_perplexity(got) == pytest.approx(math.exp(nll / tokens), rel=1e-5)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])  # GPT-2: learned positions must skip left pads
def test_batched_greedy_replies_equal_one_at_a_time(tokenizer, builder):
    model = builder(len(tokenizer))
    prompts = ["User 1: Hi.\nUser 2:", "User 1: Who wrote the book?\nUser 2: The author.\nUser 1:", "Machine"]
    got = greedy_replies(model, tokenizer, prompts, batch_size=3, max_new_tokens=6)
    for prompt, g in zip(prompts, got):
        ids = torch.tensor([tokenizer(prompt).input_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)[0, ids.shape[1]:]
        assert g == tokenizer.decode(out, skip_special_tokens=True).split("\nUser ")[0]


# ------------------------------------------------------------------ a rigged model: known accuracy

RIG = [MultipleChoice("The quick brown fox", (" sleeps all day.", " jumps over the lazy dog."), 1),
       MultipleChoice("Question: Who wrote the book? Answer:", (" The author wrote it in Paris.", " Nobody."), 0),
       MultipleChoice("Machine learning models", (" fly.", " swim.", " memorize their training data.", " rust."), 2)]
DIALOG = "User 1: Hi there.\nUser 2: Fine thanks.\nUser 1: Ok."


@pytest.fixture(scope="module")
def rigged(tokenizer):
    """A tiny Llama trained on the gold answers (and one dialogue) until it has memorised them."""
    torch.manual_seed(0)
    model = tiny_llama(len(tokenizer)).train()
    texts = [it.context + it.options[it.gold] for it in RIG] + [DIALOG]
    ids = [tokenizer(t).input_ids for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    batch, labels = {"input_ids": input_ids, "attention_mask": mask}, input_ids.masked_fill(mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    return model.eval()


def test_rigged_model_accuracy_is_known(tokenizer, rigged):
    assert [r["correct"] for r in multiple_choice_results(rigged, tokenizer, RIG, batch_size=3)] == [1.0] * 3
    wrong = [MultipleChoice(it.context, it.options, (it.gold + 1) % len(it.options)) for it in RIG]
    assert sum(r["correct"] for r in multiple_choice_results(rigged, tokenizer, wrong)) == 0
    done = completion_results(rigged, tokenizer, [Completion("The quick brown fox jumps over the lazy", " dog."),
                                                  Completion("The quick brown fox jumps over the lazy", " cat.")])
    assert [r["correct"] for r in done] == [1.0, 0.0]


def test_rigged_dialogue_reply_stops_at_next_speaker(tokenizer, rigged):
    [reply] = greedy_replies(rigged, tokenizer, ["User 1: Hi there.\nUser 2:"], max_new_tokens=24)
    assert reply == " Fine thanks."  # the memorised "\nUser 1: Ok." is cut off
    assert unigram_f1(reply, "Fine thanks.") == 1.0


# ------------------------------------------------------------------ end to end on a hand-made data folder

def _write_eval_dir(data):
    """A data folder whose eval/ holds five small tasks; returns the data folder."""
    root = data / "eval"
    (root / "reasoning").mkdir(parents=True)
    (root / "dialogue").mkdir()
    (root / "ppl").mkdir()
    (root / "reasoning" / "lambada.csv").write_text("id,text\n0,The quick brown fox jumps over the lazy dog.\n"
                                                     "1,Machine learning models memorize data\n")
    (root / "reasoning" / "pubmed_qa.csv").write_text(
        "question,abstract,final_decision\nIs it?,We looked.,yes\nReally?,We checked twice.,no\n")
    (root / "reasoning" / "mathqa_test_subset.jsonl").write_text(
        json.dumps({"problem": "1 + 1 =", "options": "a ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) 5", "correct": "b"}) + "\n")
    (root / "dialogue" / "wizard_of_wikipedia.json").write_text(
        json.dumps({"text": {"0": ["hi", "hello", "how are you", "fine"], "1": ["who wrote it", "the author"]}}))
    (root / "ppl" / "pile.csv").write_text("doc_id,text,corpus\n0,The quick brown fox.,Pile-CC\n1,def main():,Github\n")
    return data


def test_evaluate_utility_end_to_end(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer)).train()
    data = _write_eval_dir(tmp_path / "data")
    out = evaluate_utility(model, tokenizer, tasks="lambada,pubmedqa,mathqa,wizard_of_wikipedia,pile",
                           limit=2, batch_size=2, data_dir=data)
    assert model.training  # restored after the eval-mode run
    assert {k: v["n"] for k, v in out["tasks"].items()} == {
        "lambada": 2, "pubmedqa": 2, "mathqa": 1, "wizard_of_wikipedia": 2, "pile": 2}
    pub = out["tasks"]["pubmedqa"]
    assert pub["metric"] == "accuracy" and pub["higher_is_better"] and len(pub["items"][0]["scores"]) == 3
    assert out["tasks"]["pile"]["higher_is_better"] is False and out["tasks"]["pile"]["value"] > 1
    s = out["summary"]
    assert s["reasoning_tasks"] == 3 and s["reasoning_accuracy"] == pytest.approx(
        sum(out["tasks"][n]["value"] for n in ("lambada", "pubmedqa", "mathqa")) / 3)
    assert s["dialogue_f1"] == out["tasks"]["wizard_of_wikipedia"]["value"] and s["wikitext_ppl"] is None


def test_errors_name_the_fix(tmp_path, tokenizer, monkeypatch):
    monkeypatch.delenv("LOKU_DATA", raising=False)
    with pytest.raises(LokuError, match=str(tmp_path / "nowhere")):
        load_task("lambada", data_dir=tmp_path / "nowhere")
    data = _write_eval_dir(tmp_path / "data")
    (data / "eval" / "reasoning" / "lambada.csv").write_text("id,text\n")
    with pytest.raises(LokuError, match="lambada.csv holds no usable rows"):
        load_task("lambada", data_dir=data)
    (data / "eval" / "reasoning" / "pubmed_qa.csv").write_text("")
    with pytest.raises(LokuError, match="cannot read .*pubmed_qa.csv"):
        load_task("pubmedqa", data_dir=data)
    (data / "eval" / "reasoning" / "pubmed_qa.csv").write_text("question,final_decision\nIs it?,yes\n")
    with pytest.raises(LokuError, match="pubmed_qa.csv: row 0 has no field 'abstract'"):
        load_task("pubmedqa", data_dir=data)
    # not in the data folder, and the hub is out of reach (the tests run offline): one line, every place
    with pytest.raises(LokuError, match=r"task piqa not found: tried .*reasoning/piqa \(--data-dir\).*hub dataset "
                                        r"ybisk/piqa \(validation\) \(ConnectionError"):
        load_task("piqa", data_dir=data)
    with pytest.raises(LokuError, match="did you mean 'hellaswag'"):
        resolve_tasks(["helaswag"])
    monkeypatch.setenv("LOKU_DATA", str(data))
    assert len(load_task("pile")) == 2
    assert resolve_tasks("ppl,pile") == ["pile", "wikitext"]


# ------------------------------------------------------------------ the real files (skip without ../shared)

@pytest.mark.parametrize("name,count", [
    ("arc_easy", 567), ("arc_challenge", 295), ("piqa", 1838), ("hellaswag", 10042), ("copa", 100),
    ("winogrande", 1267), ("mathqa", 1000), ("pubmedqa", 500), ("lambada", 4992), ("wizard_of_wikipedia", 967),
    ("empathetic_dialogues", 2758), ("blended_skill_talk", 1009), ("wizard_of_internet", 516),
    ("pile", 1500), ("wikitext", 500)])
def test_real_task_counts(name, count):
    data = need_shared("eval").parent
    assert len(load_task(name, data_dir=data)) == count


def test_real_items_look_right():
    data = need_shared("eval").parent
    assert load_task("hellaswag", data_dir=data, limit=1)[0].context == "A man is sitting on a roof. he"
    assert load_task("mathqa", data_dir=data, limit=1)[0].options[0] == "12"
    assert load_task("lambada", data_dir=data, limit=1)[0].target == " glen"
    d = load_task("wizard_of_wikipedia", data_dir=data, limit=1)[0]
    assert d.prompt.startswith("User 1: Red is my favorite color. My house") and d.prompt.endswith("\nUser 2:")
    assert len(load_task("piqa", data_dir=data, limit=7)) == 7


def test_option_scores_match_lm_evaluation_harness(tokenizer):
    """Same numbers as EleutherAI's HFLM.loglikelihood (runs only where lm-eval is installed)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, pairs = tiny_llama(len(tokenizer)), [p for p in PAIRS if p[0]]  # HFLM rejects an empty context
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>",
                              pad_token="<|endoftext|>")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, max_length=256)
    theirs = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (logprob, greedy), ours in zip(theirs, score_continuations(model, tok, pairs, batch_size=3)):
        assert ours.logprob == pytest.approx(logprob, abs=1e-4) and ours.greedy == greedy


def test_harness_adapter_runs_a_local_task_like_our_scorer(tokenizer, tmp_path):
    """loku.harness on a model in memory, with a local multiple-choice task: the harness's per-choice
    log-likelihoods and accuracy equal loku's own scorer's (runs only where lm-eval is installed)."""
    pytest.importorskip("lm_eval")
    from loku.harness import harness_evaluate

    items = [{"question": "The sky is", "choices": ["blue", "a fox", "Paris"], "answer": 0},
             {"question": "Machine learning models", "choices": ["memorize data", "swim"], "answer": 1},
             {"question": "Alice was born in", "choices": ["Lyon", "1970", "the sea", "data"], "answer": 2}]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    (tmp_path / "task.yaml").write_text(
        "task: loku_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{{{question}}}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    model = tiny_llama(len(tokenizer))
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>",
                              pad_token="<|endoftext|>")
    out = harness_evaluate(model, tok, tasks=["loku_local_mc"], batch_size=2, include_path=str(tmp_path),
                           log_samples=True)
    ours = [[s.logprob for s in score_continuations(model, tok, [(it["question"], " " + c) for c in it["choices"]],
                                                    batch_size=3)] for it in items]
    samples = sorted(out["raw"]["samples"]["loku_local_mc"], key=lambda s: s["doc_id"])
    for it, s, mine in zip(items, samples, ours):
        theirs = [r[0][0] for r in s["resps"]]
        assert theirs == pytest.approx(mine, abs=1e-4)
    expected = sum(max(range(len(m)), key=m.__getitem__) == it["answer"] for it, m in zip(items, ours)) / len(items)
    assert out["tasks"]["loku_local_mc"]["acc"] == pytest.approx(expected)
