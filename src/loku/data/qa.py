"""Question-answer examples: the prompt comes from the tokenizer's chat template when it has one,
else `Question: ...\nAnswer: ...`; the loss covers only the answer tokens."""

from __future__ import annotations


def qa_prompt(tokenizer, question: str) -> str:
    """The text before the answer, as the model will see it at generation time."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"


def format_qa(tokenizer, question: str, answer: str, max_length: int) -> dict:
    """input_ids of prompt+answer(+eos) with labels -100 on the prompt, truncated to max_length."""
    prompt = qa_prompt(tokenizer, question)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    prompt_ids = tokenizer(prompt, add_special_tokens=not has_template)["input_ids"]
    # Without a template the answer follows "Answer:" after a space, tokenized as in running text.
    answer_ids = tokenizer(answer if has_template else " " + answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}
