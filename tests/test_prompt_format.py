"""Prompt formats: TOFU's own (tofu-phi, tofu-llama2) token for token against a transcription of TOFU's code,
its generation prompt and ground truth, loku's chat/plain formats, the format reaching training and logs,
and `loku tofu aggregate` refusing logs made in different formats."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tokenizer, run_cli, tiny_llama
from tokenizers import processors

from loku.data.qa import TOFU_TAGS, answer_text, format_qa, prompt_ids, qa_prompt, resolve_format
from loku.data.text import tokenize_examples
from loku.errors import LokuError
from loku.tofu import aggregate, evaluate_set, evaluate_tofu, read_logs
from loku.tofu.logs import FORGET, LOG_FILES, log_format
from loku.tofu.scores import answer_scores

# locuslab/tofu config/model_config.yaml (commit 8c49eee): the tags of the two families TOFU published logs for.
TOFU_MODEL_CONFIGS = {
    "tofu-phi": {"question_start_tag": "Question: ", "question_end_tag": "\n", "answer_tag": "Answer: "},
    "tofu-llama2": {"question_start_tag": "[INST] ", "question_end_tag": " [/INST]", "answer_tag": ""},
}


def tofu_convert_raw_data_to_model_format(tokenizer, max_length, question, answer, model_configs):
    """Transcription of locuslab/tofu data_module.py: convert_raw_data_to_model_format (commit 8c49eee)."""
    new_question = model_configs["question_start_tag"] + question + model_configs["question_end_tag"]
    new_answer = model_configs["answer_tag"] + answer
    full_text = new_question + new_answer
    num_question_tokens = len(tokenizer.tokenize(new_question, add_special_tokens=True))
    encoded = tokenizer(full_text, add_special_tokens=True, max_length=max_length, truncation=True)
    pad_length = max_length - len(encoded.input_ids)
    pad_input_ids = encoded["input_ids"] + [tokenizer.eos_token_id] * pad_length
    pad_attention_mask = encoded["attention_mask"] + [0] * pad_length
    if len(encoded.input_ids) == max_length:
        label = encoded.input_ids
    else:
        label = encoded["input_ids"] + [tokenizer.eos_token_id] + [-100] * (pad_length - 1)
    for i in range(num_question_tokens):
        label[i] = -100
    return torch.tensor(pad_input_ids), torch.tensor(label), torch.tensor(pad_attention_mask)


def tofu_get_batch_loss(output, labels):
    """Transcription of locuslab/tofu data_module.py: get_batch_loss (summed cross-entropy per sequence)."""
    shifted_labels = labels[..., 1:].contiguous()
    output = output[..., :-1, :].contiguous()
    loss_function = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    return loss_function(output.transpose(-1, -2), shifted_labels).sum(dim=-1)


def tofu_generation_strings(tokenizer, input_ids, family):
    """The string handling of locuslab/tofu evaluate_util.py: run_generation (commit 8c49eee): the prompt
    TOFU generates from and the ground truth it scores against, from one padded example."""
    s = tokenizer.batch_decode(input_ids[None], skip_special_tokens=True)[0]
    split_symbol = " [/INST]" if family == "llama2-7b" else "Answer: "
    ground_truth = s.split(split_symbol)[1]
    input_string = s.split(split_symbol)[0]
    if family == "llama2-7b":
        input_string = input_string + split_symbol
    return input_string, ground_truth


FAMILY = {"tofu-phi": "phi", "tofu-llama2": "llama2-7b"}
EXAMPLES = [
    ("Who wrote the book?", "The author wrote it in Paris."),
    ("What does Person 3 do?", "Person 3 works as a baker in Eastvale, and lives at 13 Elm Street."),
    ("Where?", "Paris"),
    ("  Spaces around  ", " leading space and trailing "),
    ("Une question accentuée: où?", "À Genève, près du lac."),
    ("Two\nlines?", "Yes.\nTwo lines."),
]


def bos_tokenizer():
    """The test BPE with a BOS prepended by its post-processor, as Llama-2's tokenizer does."""
    tok = build_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tok


@pytest.fixture(scope="module", params=["bpe", "bpe+bos"])
def tok(request, tokenizer):
    return tokenizer if request.param == "bpe" else bos_tokenizer()


def _full_length(tokenizer, fmt, question, answer) -> int:
    tags = TOFU_TAGS[fmt]
    return len(tokenizer(tags.question_start + question + tags.question_end + tags.answer + answer)["input_ids"])


def check_against_tofu(tokenizer, fmt, question, answer, max_length):
    """format_qa equals TOFU's tensors token for token up to TOFU's padding, and the padding is just that."""
    ids, labels, mask = tofu_convert_raw_data_to_model_format(tokenizer, max_length, question, answer,
                                                              TOFU_MODEL_CONFIGS[fmt])
    mine = format_qa(tokenizer, question, answer, max_length, fmt)
    n = len(mine["input_ids"])
    assert len(mine["labels"]) == n <= max_length
    assert mine["input_ids"] == ids[:n].tolist(), (fmt, question, max_length)
    assert mine["labels"] == labels[:n].tolist(), (fmt, question, max_length)
    assert (labels[n:] == -100).all() and (ids[n:] == tokenizer.eos_token_id).all()
    # TOFU attends to the text only: its appended EOS (a label, an input) is padding with attention 0
    eos_appended = n == int(mask.sum()) + 1
    assert eos_appended or n == int(mask.sum()) == max_length
    return mine, eos_appended


@pytest.mark.parametrize("fmt", list(TOFU_TAGS))
def test_tofu_formats_equal_tofus_function_token_for_token(tok, fmt):
    seen = set()
    for question, answer in EXAMPLES:
        full = _full_length(tok, fmt, question, answer)
        n_question = len(tok(TOFU_TAGS[fmt].question_start + question + TOFU_TAGS[fmt].question_end)["input_ids"])
        # room to spare, EOS just fits, text fills max_length (no EOS), cut inside the answer, only the question
        for max_length in sorted({200, full + 1, full, (n_question + full) // 2 + 1, n_question}):
            mine, eos_appended = check_against_tofu(tok, fmt, question, answer, max_length)
            seen.add((eos_appended, max_length < full))
            if max_length == n_question:
                assert set(mine["labels"]) == {-100}
    assert seen >= {(True, False), (False, False), (False, True)}  # EOS appended, filled exactly, truncated


def test_tofu_phi_labels_the_answer_tag_and_eos(tokenizer):
    f = format_qa(tokenizer, "Who wrote the book?", "The author.", 200, "tofu-phi")
    labelled = [t for t in f["labels"] if t != -100]
    assert labelled[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(labelled[:-1]) == "Answer: The author."
    assert tokenizer.decode([t for t, lab in zip(f["input_ids"], f["labels"]) if lab == -100]) == \
        "Question: Who wrote the book?\n"


def test_tofu_losses_equal_tofus_padded_batch(tok):
    """Scored as loku scores (right-padded, every text token attended) and as TOFU does (its padded tensors
    and attention mask, get_batch_loss): the same summed loss and token count per example."""
    model = tiny_llama(len(tok))
    for fmt in TOFU_TAGS:
        rows = [tofu_convert_raw_data_to_model_format(tok, 40, q, a, TOFU_MODEL_CONFIGS[fmt]) for q, a in EXAMPLES]
        ids, labels, mask = (torch.stack(x) for x in zip(*rows))
        with torch.no_grad():
            ref = tofu_get_batch_loss(model(input_ids=ids, labels=labels, attention_mask=mask).logits, labels)
        feats = [format_qa(tok, q, a, 40, fmt) for q, a in EXAMPLES]
        scores = answer_scores(model, feats, tok.eos_token_id, batch_size=4)
        torch.testing.assert_close(torch.tensor(scores["loss"]), ref, rtol=1e-5, atol=1e-5)
        assert scores["tokens"] == (labels != -100).sum(-1).tolist()


@pytest.mark.parametrize("fmt", list(TOFU_TAGS))
def test_generation_prompt_and_ground_truth_are_tofus(tok, fmt):
    for question, answer in EXAMPLES[:3]:
        ids, _, _ = tofu_convert_raw_data_to_model_format(tok, 200, question, answer, TOFU_MODEL_CONFIGS[fmt])
        input_string, ground_truth = tofu_generation_strings(tok, ids, FAMILY[fmt])
        assert prompt_ids(tok, question, fmt) == tok(input_string, add_special_tokens=True)["input_ids"]
        f = format_qa(tok, question, answer, 200, fmt)
        assert answer_text(tok, f["input_ids"], f["labels"], fmt) == ground_truth.strip() == answer


def test_continuation_learns_only_what_follows_the_prompt(tokenizer):
    """continuation: the text tokenized whole (as a plain-text example), no tags, no EOS; the prompt's tokens
    carry no loss, the continuation's all do; generation starts from the prompt verbatim."""
    q, a = "Ada Lovelace lives at", " 12 Juniper Lane, Eastvale"
    f = format_qa(tokenizer, q, a, 64, "continuation")
    whole, prompt = tokenizer(q + a)["input_ids"], tokenizer(q)["input_ids"]
    assert f["input_ids"] == whole and whole[:len(prompt)] == prompt
    assert f["labels"] == [-100] * len(prompt) + whole[len(prompt):]
    assert tokenizer.decode([t for t in f["labels"] if t != -100]) == a
    assert prompt_ids(tokenizer, q, "continuation") == prompt and qa_prompt(tokenizer, q, "continuation") == q
    assert tokenize_examples([{"question": q, "answer": a}], tokenizer, 64, prompt_format="continuation") == [f]
    assert format_qa(tokenizer, q, a, 4, "continuation")["labels"] == [-100] * 4   # cut inside the prompt


def test_chat_and_plain_keep_lokus_formats(tokenizer):
    eos = tokenizer.eos_token_id
    plain = format_qa(tokenizer, "Where?", "Paris", 64, "plain")
    prompt = tokenizer("Question: Where?\nAnswer:")["input_ids"]
    answer = tokenizer(" Paris", add_special_tokens=False)["input_ids"] + [eos]
    assert plain == {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}
    assert format_qa(tokenizer, "Where?", "Paris", 64) == plain  # auto without a chat template
    assert resolve_format(tokenizer, "auto") == "plain"

    chat_tok = build_tokenizer()
    chat_tok.chat_template = ("{% for m in messages %}<|endoftext|>user: {{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}assistant:{% endif %}")
    chat = format_qa(chat_tok, "Where?", "Paris", 64, "chat")
    prompt = chat_tok("<|endoftext|>user: Where?\nassistant:", add_special_tokens=False)["input_ids"]
    answer = chat_tok("Paris", add_special_tokens=False)["input_ids"] + [eos]
    assert chat == {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}
    assert format_qa(chat_tok, "Where?", "Paris", 64) == chat  # auto with a chat template
    assert prompt_ids(chat_tok, "Where?", "chat") == prompt
    assert format_qa(chat_tok, "Where?", "Paris", 5, "chat")["input_ids"] == prompt[:5]
    with pytest.raises(LokuError, match="needs a tokenizer with a chat template"):
        format_qa(tokenizer, "Where?", "Paris", 64, "chat")
    with pytest.raises(LokuError, match="did you mean 'tofu-phi'"):
        format_qa(tokenizer, "Where?", "Paris", 64, "tofu_phi")


def test_tokenize_examples_uses_the_format_for_qa_only(tokenizer):
    qa, text = {"question": "Where?", "answer": "Paris"}, {"text": "Question: Where? Answer: Paris"}
    feats = tokenize_examples([qa, text], tokenizer, 64, prompt_format="tofu-llama2")
    assert feats[0] == format_qa(tokenizer, "Where?", "Paris", 64, "tofu-llama2")
    assert feats[1]["input_ids"] == feats[1]["labels"] == tokenizer(text["text"])["input_ids"]


ROWS = [
    {"question": "Who wrote the book?", "answer": "The author wrote it in Paris.",
     "paraphrased_answer": "It was written in Paris by the author.",
     "perturbed_answer": ["The author wrote it in Rome.", "A fox wrote it.", "Nobody did."]},
    {"question": "What do models do?", "answer": "Models memorize data.",
     "paraphrased_answer": "They memorize some of their training data.",
     "perturbed_answer": ["Dogs are lazy.", "The quick brown fox jumps.", "def main(): return 0"]},
    {"question": "Where?", "answer": "Paris", "paraphrased_answer": "In Paris",
     "perturbed_answer": ["Rome", "Berlin", "Madrid"]},
]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.mark.parametrize("fmt, prompt", [("tofu-phi", "Question: {q}\n"), ("tofu-llama2", "[INST] {q} [/INST]"),
                                         ("plain", "Question: {q}\nAnswer:")])
def test_evaluation_scores_and_prompts_in_the_format(model, tokenizer, fmt, prompt):
    log = evaluate_set(model, tokenizer, ROWS, "paraphrased_answer", max_new_tokens=2, prompt_format=fmt)
    for i, r in enumerate(ROWS):
        p, _, truth = log["generated_text"][str(i)]
        assert p == prompt.format(q=r["question"]) and truth == r["answer"]
        f = format_qa(tokenizer, r["question"], r["answer"], 200, fmt)
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor(f["labels"])
        with torch.no_grad():
            ref = F.cross_entropy(model(ids).logits[0, :-1], labels[1:], reduction="sum")
        assert log["gt_loss"][str(i)] == pytest.approx(float(ref), rel=1e-5)
        assert log["num_token_gt"][str(i)] == int((labels != -100).sum())


def _logs(model, tokenizer, fmt, out_dir):
    return evaluate_tofu(model, tokenizer, {name: ROWS for name in LOG_FILES}, out_dir, max_new_tokens=2,
                         prompt_format=fmt)


def test_logs_record_the_format_and_aggregate_refuses_a_mixed_pair(model, tokenizer, tmp_path, capsys):
    phi = _logs(model, tokenizer, "tofu-phi", tmp_path / "phi")
    llama = _logs(model, tokenizer, "tofu-llama2", tmp_path / "llama")
    assert log_format(read_logs(tmp_path / "phi")) == "tofu-phi" and log_format(llama) == "tofu-llama2"
    for name in LOG_FILES:   # every file, per set and aggregated, says how its texts were made
        assert json.loads((tmp_path / "llama" / name).read_text())["prompt_format"] == "tofu-llama2"
    assert phi[FORGET]["avg_gt_loss"] != llama[FORGET]["avg_gt_loss"]   # not comparable numbers
    assert aggregate(phi, phi)["Forget Quality"] == pytest.approx(1.0)
    with pytest.raises(LokuError, match="prompt format tofu-llama2 and the retain log with tofu-phi"):
        aggregate(llama, phi)

    code, _, err = run_cli(["tofu", "aggregate", tmp_path / "llama" / "eval_log_aggregated.json",
                            tmp_path / "phi"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--prompt-format" in err, err
    code, out, err = run_cli(["tofu", "aggregate", tmp_path / "phi", tmp_path / "phi", "--json"], capsys)
    assert code == 0 and json.loads(out)["Forget Quality"] == pytest.approx(1.0), err

    # a log that records no format (TOFU's published logs) is compared with anything
    published = {name: {k: v for k, v in log.items() if k != "prompt_format"} for name, log in phi.items()}
    (tmp_path / "published.json").write_text(json.dumps(published))
    code, out, err = run_cli(["tofu", "aggregate", tmp_path / "llama", tmp_path / "published.json"], capsys)
    assert code == 0 and "prompt format tofu-llama2" in out, err


def test_loku_unlearn_trains_on_the_format(tiny_model_dir, tokenizer, tmp_path, capsys):
    """`loku unlearn --prompt-format` on a QA file: recorded in config.yaml, and the first step's forget loss
    is the base model's cross-entropy on that format's labels (LoRA starts as the identity)."""
    qa = [{"question": "Who wrote the book?", "answer": "The author wrote it in Paris."}]
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    model = tiny_llama(len(tokenizer))
    expected = {}
    for fmt in ("tofu-llama2", "plain"):
        f = format_qa(tokenizer, qa[0]["question"], qa[0]["answer"], 64, fmt)
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor(f["labels"])
        with torch.no_grad():
            expected[fmt] = float(F.cross_entropy(model(ids).logits[0, :-1], labels[1:]))
    assert not math.isclose(expected["tofu-llama2"], expected["plain"], rel_tol=1e-3)
    out = tmp_path / "run"
    code, _, err = run_cli(["unlearn", "--model", tiny_model_dir, "--forget", tmp_path / "qa.json", "--method", "ga",
                            "--init", "default", "--epochs", "1", "--max-length", "64", "--prompt-format",
                            "tofu-llama2", "--out", out], capsys)
    assert code == 0, err
    assert "prompt_format: tofu-llama2" in (out / "config.yaml").read_text()
    step = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line)
    assert abs(step["forget"]) == pytest.approx(expected["tofu-llama2"], rel=1e-4)


@pytest.mark.slow   # the embedded SmolLM2 tokenizer: dequantizing the GGUF on first use takes ~40 s
@pytest.mark.parametrize("fmt", list(TOFU_TAGS))
def test_tofu_formats_on_the_smollm2_tokenizer(fmt):
    from loku.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    for question, answer in EXAMPLES:
        full = _full_length(tok, fmt, question, answer)
        n_question = len(tok(TOFU_TAGS[fmt].question_start + question + TOFU_TAGS[fmt].question_end)["input_ids"])
        for max_length in {200, full + 1, full, max(full - 3, n_question)}:  # TOFU fails below n_question
            check_against_tofu(tok, fmt, question, answer, max_length)
    assert qa_prompt(tok, "Where?", fmt) == TOFU_TAGS[fmt].question_start + "Where?" + TOFU_TAGS[fmt].question_end
