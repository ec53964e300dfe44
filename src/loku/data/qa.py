"""Question-answer examples in a prompt format; the loss covers only what the model should answer.

Formats (`prompt_format`):
- `auto` (the default for QA files): `chat` when the tokenizer has a chat template, else `plain`.
- `chat`: the tokenizer's chat template, the question as the user turn, then the answer and EOS.
- `plain`: `Question: {question}\\nAnswer:` as the prompt, then ` {answer}` and EOS.
- `continuation`: no tags: the question is the start of a text and the answer its continuation, both verbatim
  (the answer brings its own leading space), no EOS; the text is tokenized as a whole (as a plain-text example
  is) and the loss covers the tokens after the question's. For forgetting the values inside a text (the demo:
  "<name> lives at" -> " <address>") without training on the words around them.
- `tofu-phi`, `tofu-llama2`: TOFU's own format (locuslab/tofu `data_module.py:
  convert_raw_data_to_model_format` with the tags of its `config/model_config.yaml`): the text
  `question_start_tag + question + question_end_tag + answer_tag + answer` tokenized as a whole with special
  tokens, EOS appended unless truncation filled `max_length`, and only the first `num_question_tokens` masked,
  counted by tokenizing `question_start_tag + question + question_end_tag` alone. So the answer tag
  ("Answer: " for phi) is part of the labels, and generation starts from the question with its tags.
  TOFU also right-pads every example to `max_length` with EOS (attention 0, labels -100); padding is the
  collator's business here, and the appended EOS is attended to, which changes no labelled logit in a
  causal model (a logit only sees the tokens before it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LokuError
from ..registry import unknown_choice


@dataclass(frozen=True)
class TofuTags:
    """TOFU's question_start_tag, question_end_tag and answer_tag of one model family."""

    question_start: str
    question_end: str
    answer: str

    @property
    def split_symbol(self) -> str:
        """What TOFU's `run_generation` splits the decoded text on to find the ground-truth answer."""
        return self.answer or self.question_end


# locuslab/tofu config/model_config.yaml: phi (also stablelm and pythia) and llama2-7b.
TOFU_TAGS = {
    "tofu-phi": TofuTags("Question: ", "\n", "Answer: "),
    "tofu-llama2": TofuTags("[INST] ", " [/INST]", ""),
}
PROMPT_FORMATS = ("auto", "chat", "plain", "continuation", *TOFU_TAGS)
DEFAULT_PROMPT_FORMAT = "auto"      # QA files: what loku did before formats could be chosen
TOFU_PROMPT_FORMAT = "tofu-phi"     # `loku tofu`: TOFU's format for every family but llama2-7b
PROMPT_FORMAT_HELP = ("How a question and its answer become tokens: auto (chat if the tokenizer has a chat "
                      "template, else plain), chat, plain ('Question: ...\\nAnswer: ...'), continuation (no tags: the "
                      "answer continues the question verbatim), tofu-phi or tofu-llama2 (TOFU's own tags and labels).")


def check_prompt_format(name: str) -> str:
    if name not in PROMPT_FORMATS:
        raise unknown_choice("prompt format", name, PROMPT_FORMATS)
    return name


def resolve_format(tokenizer, prompt_format: str = DEFAULT_PROMPT_FORMAT) -> str:
    """`auto` made concrete for this tokenizer; `chat` without a chat template is an error."""
    check_prompt_format(prompt_format)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return "chat" if has_template else "plain"
    if prompt_format == "chat" and not has_template:
        raise LokuError("prompt format chat needs a tokenizer with a chat template, and this one has none: "
                        "pass --prompt-format plain (or auto)")
    return prompt_format


def qa_prompt(tokenizer, question: str, prompt_format: str = DEFAULT_PROMPT_FORMAT) -> str:
    """The text before the answer, as the model sees it at generation time."""
    fmt = resolve_format(tokenizer, prompt_format)
    if fmt == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    if fmt == "plain":
        return f"Question: {question}\nAnswer:"
    if fmt == "continuation":
        return question
    tags = TOFU_TAGS[fmt]
    return tags.question_start + question + tags.question_end


def prompt_ids(tokenizer, question: str, prompt_format: str = DEFAULT_PROMPT_FORMAT) -> list[int]:
    """The tokens generation starts from. TOFU (`evaluate_util.py: run_generation`) encodes the text before
    its split symbol with special tokens, which is `question_start_tag + question + question_end_tag` for
    both families (llama2 gets " [/INST]" put back); for chat and plain, the prompt of `format_qa`."""
    fmt = resolve_format(tokenizer, prompt_format)
    return tokenizer(qa_prompt(tokenizer, question, fmt), add_special_tokens=fmt != "chat")["input_ids"]


def format_qa(tokenizer, question: str, answer: str, max_length: int,
              prompt_format: str = DEFAULT_PROMPT_FORMAT) -> dict:
    """{"input_ids", "labels"} of one example, labels -100 where no loss applies, at most max_length tokens.
    For the tofu-* formats both equal TOFU's `convert_raw_data_to_model_format` token for token, its padding
    aside."""
    fmt = resolve_format(tokenizer, prompt_format)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt in TOFU_TAGS:
        tags = TOFU_TAGS[fmt]
        question_text = tags.question_start + question + tags.question_end
        ids = tokenizer(question_text + tags.answer + answer, add_special_tokens=True, truncation=True,
                        max_length=max_length)["input_ids"]
        n_question = len(tokenizer(question_text, add_special_tokens=True)["input_ids"])
        if len(ids) < max_length:  # TOFU labels the EOS only when truncation left room for it
            ids = ids + eos
        return {"input_ids": ids, "labels": [-100] * min(n_question, len(ids)) + ids[n_question:]}
    if fmt == "continuation":   # as the whole text tokenizes; the prompt's tokens carry no loss
        ids = tokenizer(question + answer, truncation=True, max_length=max_length)["input_ids"]
        n_prompt = min(len(prompt_ids(tokenizer, question, fmt)), len(ids))
        return {"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]}
    prompt = prompt_ids(tokenizer, question, fmt)
    # plain: the answer follows "Answer:" after a space, tokenized as in running text
    answer_ids = tokenizer(answer if fmt == "chat" else " " + answer, add_special_tokens=False)["input_ids"] + eos
    ids = (prompt + answer_ids)[:max_length]
    labels = ([-100] * len(prompt) + answer_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def answer_text(tokenizer, input_ids: list[int], labels: list[int], prompt_format: str = DEFAULT_PROMPT_FORMAT) -> str:
    """The ground-truth answer that generations are scored against (ROUGE), from a `format_qa` example.
    TOFU decodes the whole example and keeps what follows its split symbol ("Answer: " for phi, " [/INST]"
    for llama2), so the answer tag is not part of it; chat and plain decode the labelled tokens."""
    fmt = resolve_format(tokenizer, prompt_format)
    if fmt in TOFU_TAGS:
        parts = tokenizer.decode(input_ids, skip_special_tokens=True).split(TOFU_TAGS[fmt].split_symbol)
        return parts[1].strip() if len(parts) > 1 else ""  # TOFU's s.split(split_symbol)[1]
    return tokenizer.decode([t for t in labels if t != -100], skip_special_tokens=True).strip()
