"""Under FSDP or DeepSpeed ZeRO-3 (tests/fsdp_on_cpu.py), loku.distributed.prepare_reference shards the frozen
reference model like the trained one, and its logits equal the unsharded model's. Run by test_distributed.py."""

import sys

import fsdp_on_cpu  # noqa: F401  (switches accelerate to FSDP / DeepSpeed on CPU processes)
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from loku.distributed import exit_process, prepare_reference, set_micro_batch

# Loaded before the Accelerator, as loku does (after it, ZeRO-3's zero3_init_flag would partition at load).
full = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
reference = AutoModelForCausalLM.from_pretrained(sys.argv[1])
accelerator = Accelerator(cpu=True)
set_micro_batch(accelerator, 2)
world = accelerator.num_processes
reference = prepare_reference(accelerator, reference)
for (name, p), (_, q) in zip(reference.named_parameters(), full.named_parameters()):
    assert not p.requires_grad, name
    if hasattr(p, "ds_tensor"):   # ZeRO-3: the process keeps a 1/world slice (padded) of the flattened weight
        assert p.numel() == 0 and p.ds_numel == q.numel(), name   # nothing whole between forwards
        assert q.numel() / world <= p.ds_tensor.numel() < q.numel() / world + 64, (name, p.ds_tensor.numel())
    else:
        from torch.distributed.tensor import DTensor

        assert isinstance(p, DTensor), f"{name} is not sharded"
        assert p.to_local().shape[0] == -(-q.shape[0] // world), (name, p.to_local().shape, q.shape)
ids = torch.randint(0, full.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    want, got = full(input_ids=ids).logits, reference(input_ids=ids).logits
assert torch.allclose(want, got, atol=1e-5), float((want - got).abs().max())
print(f"reference sharded over {world} processes; logits equal")
exit_process(0)   # as the CLI leaves: not through the interpreter's teardown (see its docstring)
