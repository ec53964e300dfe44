"""Run the loku CLI under accelerate's FSDP on CPU processes (gloo), so the test suite exercises loku's
sharded-engine code with torch's real FSDP without a GPU.

accelerate starts FSDP only when it finds GPUs (on CPUs it quietly falls back to plain data parallel), yet
torch's FSDP itself runs on CPU tensors and gloo. This wrapper switches accelerate's state to FSDP after it
is built, exactly as it would have been on GPUs; nothing else is changed. Use:
    accelerate launch --use_fsdp --fsdp_version 2 ... tests/fsdp_on_cpu.py unlearn ...
"""

import os

import accelerate
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

_init = accelerate.Accelerator.__init__


def _init_as_on_gpus(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and \
            self.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()   # from the launch configuration, as accelerate builds it
        if self.mixed_precision != "no":
            plugin.set_mixed_precision(self.mixed_precision)
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
        AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and \
            self.distributed_type == DistributedType.MULTI_CPU:
        plugin = DeepSpeedPlugin()   # from the launch configuration, as accelerate builds it on GPUs
        plugin.set_mixed_precision(self.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        AcceleratorState._shared_state["deepspeed_plugins"] = plugin
        AcceleratorState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
        PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED


accelerate.Accelerator.__init__ = _init_as_on_gpus

if __name__ == "__main__":
    from loku.cli import main

    main()
