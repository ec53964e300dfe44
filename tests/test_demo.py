"""The demo pipeline end to end on a tiny model (the real run, `make demo`, uses SmolLM2-135M)."""

import json

from loku.demo import DemoConfig, leaks, run_demo
from loku.data.records import make_records, record_text


def test_demo_pipeline_writes_report_plot_and_adapter(tiny_model_dir, tmp_path):
    out = tmp_path / "demo"
    cfg = DemoConfig(out=str(out), model=str(tiny_model_dir), memorize_lr=3e-3, unlearn_lr=1e-2,
                     mixed_precision="no", **DemoConfig.quick_overrides())
    report = run_demo(cfg)
    for key in ("base", "leaked", "unlearned"):
        assert 0.0 <= report[key]["forget_memorization"] <= 1.0 and report[key]["general_ppl"] > 1.0
    assert [c["phase"] for c in report["curves"]].count("memorize") >= 1
    assert json.loads((out / "report.json").read_text())["unlearn_epochs"] == report["unlearn_epochs"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "unlearned" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "manifest.json").is_file()


def test_leak_score_counts_revealed_fields(tokenizer):
    """A 'model' that always continues with one record's exact text leaks all 5 of its fields, none of others'."""
    import torch

    rec, other = make_records(2, seed=9)
    target = tokenizer(record_text(rec)[len(f"{rec.name} lives at"):], add_special_tokens=False)["input_ids"]

    class Parrot(torch.nn.Module):
        def generate(self, input_ids, attention_mask=None, max_new_tokens=0, **kw):
            tail = torch.tensor(target[:max_new_tokens]).repeat(input_ids.shape[0], 1)
            return torch.cat([input_ids, tail], dim=1)

    tokenizer.pad_token = tokenizer.eos_token
    scores, texts = leaks(Parrot(), tokenizer, [rec, other], max_new_tokens=len(target))
    assert scores == [1.0, 0.0]
