"""Under FSDP (tests/fsdp_on_cpu.py), loku.distributed.prepare_reference shards the frozen reference model
like the trained one, and its logits equal the unsharded model's. Run by test_distributed.py."""

import sys

import fsdp_on_cpu  # noqa: F401  (switches accelerate to FSDP on CPU processes)
import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from loku.distributed import prepare_reference

accelerator = Accelerator(cpu=True)
world = accelerator.num_processes
full = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
reference = prepare_reference(accelerator, AutoModelForCausalLM.from_pretrained(sys.argv[1]))
for (name, p), (_, q) in zip(reference.named_parameters(), full.named_parameters()):
    assert isinstance(p, DTensor), f"{name} is not sharded"
    assert p.to_local().shape[0] == -(-q.shape[0] // world), (name, p.to_local().shape, q.shape)
    assert not p.requires_grad, name
ids = torch.randint(0, full.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    want, got = full(input_ids=ids).logits, reference(input_ids=ids).logits
assert torch.allclose(want, got, atol=1e-5), float((want - got).abs().max())
print(f"reference sharded over {world} processes; logits equal")
