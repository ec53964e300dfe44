"""Tiny models and a small locally trained tokenizer, so the fast suite needs no network and no ../shared."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models gain nothing from more, and oversubscribed OpenMP threads crawl
# No test downloads: a hub look-up (loku.data.sources' last resort) then fails at once, not after ~30 s of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _corpus() -> list[str]:
    from loku.data.records import make_records, record_text

    lines = [record_text(r) for r in make_records(400, seed=123)]
    lines += [
        "The quick brown fox jumps over the lazy dog.",
        "Question: Who wrote the book? Answer: The author wrote it in Paris.",
        "Machine learning models memorize some of their training data.",
        "def main():\n    return 0\n",
    ] * 20
    return lines


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE of `vocab_size` tokens trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gptneo(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_layers=layers, num_heads=4,
        attention_types=[[["global", "local"], layers // 2]], window_size=32, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=0,
    )
    return GPTNeoForCausalLM(cfg).eval()


def tiny_gpt2(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A saved tiny Llama + tokenizer directory, loadable like any local Hugging Face model."""
    d = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_llama(len(tokenizer))
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def write_csv(path, rows, column="text"):
    """A one-column CSV of `rows` (csv module quoting), returned as a str path."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([column])
        w.writerows([r] for r in rows)
    return str(path)


def run_cli(args, capsys):
    """`loku ARGS` in process: (exit code, stdout, stderr)."""
    import sys

    from loku.cli import main

    old, sys.argv, code = sys.argv, ["loku", *map(str, args)], 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def need_shared(*parts: str) -> Path:
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs the public data folder {p} (../shared/data beside the checkout); absent here")
    return p


def token_accuracy(model, tokenizer, texts) -> float:
    """Mean over sequences of the fraction of next tokens the model predicts greedily."""
    accs = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tokenizer(t)["input_ids"]])
            pred = model(input_ids=ids).logits[0, :-1].argmax(-1)
            accs.append((pred == ids[0, 1:]).float().mean().item())
    return sum(accs) / len(accs)


def memorize(model, tokenizer, texts, steps: int = 120, lr: float = 1e-2):
    """Full-batch Adam on `texts` (tokenized without special tokens, as the audit scores them): after 120 steps
    a tiny model reproduces 16 records nearly token for token. Returns the model in eval mode."""
    from loku.data.batches import collate

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    batch = collate([{"input_ids": i, "labels": i} for i in ids], tokenizer.pad_token_id or 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def record_texts(n: int, seed: int = 7) -> list[str]:
    from loku.data.records import make_records, record_text

    return [record_text(r) for r in make_records(n, seed=seed)]


@pytest.fixture(scope="session")
def memorized():
    """(model, tokenizer, A, B): a tiny Llama trained to memorize the 16 records A; B are 16 it never saw.
    The tokenizer is its own (with a pad token), not the shared `tokenizer` fixture."""
    from loku.models import ensure_pad_token

    tok = ensure_pad_token(build_tokenizer())
    texts = record_texts(32)
    a, b = texts[:16], texts[16:]
    return memorize(tiny_llama(len(tok)), tok, a), tok, a, b
