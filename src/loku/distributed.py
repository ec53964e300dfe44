"""Work split across the processes of `accelerate launch` (or torchrun) and gathered back in order.

Everything here is a no-op in one process, so library code calls it unconditionally. Two kinds of work:
sums (Fisher statistics: each process takes every world-th batch, then the sums and token counts are
all-reduced) and per-item evaluation (each process scores every world-th item; the per-item results are
gathered and put back in item order on every process). Per-item evaluation is only split when every
process holds the whole model (DDP, multi-CPU): under FSDP or DeepSpeed a forward pass is collective, so
processes with different numbers of batches would wait on each other forever; there each process
evaluates everything, in step with the others.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
from typing import Callable, NoReturn, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def rank_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def native_bf16() -> bool:
    """Whether bf16 is computed natively here: a CUDA device that supports it, or a CPU with AVX512-BF16 or AMX.
    Elsewhere CPU bf16 is emulated: on a 2-core AVX2 EPYC (2026-12-04, benchmarks/precision_cpu.py) a LoRA step of
    SmolLM2-135M took 18x (2 x 65 tokens, 1 thread) to 36x (8 x 200, 2 threads) longer under bf16 autocast."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def launch_precision(asked: str | None) -> str:
    """Mixed precision as asked, else the launch configuration's (`accelerate launch --mixed_precision`,
    `mixed_precision:` in its config file), else "no". Passing "no" to accelerate would override the file.
    "auto" is bf16 where it is native (`native_bf16`), else no; an explicit bf16 on a CPU that only emulates it
    runs as asked, with one warning line."""
    chosen = asked or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no"
    if chosen == "auto":
        return "bf16" if native_bf16() else "no"
    if chosen == "bf16" and os.environ.get("RANK", "0") == "0" and not native_bf16():
        _warn_emulated_bf16()
    return chosen


@functools.cache
def _warn_emulated_bf16() -> None:
    """Once a process."""
    print("warning: this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated, measured 18-36x "
          "slower than fp32; pass --mixed-precision auto or no", file=sys.stderr)


def requested_engine() -> str | None:
    """The sharding engine the launch configuration asks for ("FSDP", "DeepSpeed") or None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return "DeepSpeed"
    return None


def sharded_engine() -> bool:
    """True under FSDP or DeepSpeed, where the weights are split and every forward pass is collective."""
    if requested_engine():
        return True
    try:
        from accelerate.state import DistributedType, PartialState
    except ImportError:
        return False
    kind = PartialState._shared_state.get("distributed_type")
    return kind in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def start_accelerator(grad_accum: int, mixed_precision: str | None, batch_size: int):
    """(accelerator, engine) for a training loop: mixed precision as asked else the launch configuration's, the
    engine checked to be the one asked for (`check_engine`), DeepSpeed's micro batch filled in."""
    import torch
    from accelerate import Accelerator

    from .errors import LokuError

    try:
        accelerator = Accelerator(gradient_accumulation_steps=grad_accum,
                                  mixed_precision=launch_precision(mixed_precision),
                                  cpu=not torch.cuda.is_available())
    except (RuntimeError, ValueError, ImportError) as e:   # e.g. an FSDP1 launch config on a CPU machine
        raise LokuError(f"accelerate could not start this launch configuration ({e}): FSDP and DeepSpeed need "
                        f"GPUs; on CPUs launch with configs/accelerate/ddp.yaml or a single process") from None
    engine = check_engine(accelerator)
    set_micro_batch(accelerator, batch_size)
    return accelerator, engine


def check_engine(accelerator) -> str | None:
    """The engine accelerate really started ("FSDP", "DeepSpeed" or None), after checking it is the one the
    launch configuration asked for: without GPUs accelerate quietly runs an FSDP config as plain data
    parallel, which would hold a whole model copy per process where the user planned for a shard."""
    from accelerate.utils import DistributedType

    started = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}.get(
        accelerator.distributed_type)
    asked = requested_engine()
    if asked and started != asked:
        from .errors import LokuError

        raise LokuError(f"the launch configuration asks for {asked}, but accelerate started "
                        f"{accelerator.distributed_type.value} instead ({asked} runs through accelerate only on "
                        "GPUs): on CPUs launch with configs/accelerate/ddp.yaml or run a single process")
    return started


def set_micro_batch(accelerator, batch_size: int) -> None:
    """DeepSpeed sizes its engine from the micro batch, which accelerate reads off a dataloader; loku forms its
    own global batches (no dataloader), so it fills in the launch file's "auto" with the per-process batch."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            config["train_micro_batch_size_per_gpu"] = batch_size


def gathered_state(accelerator, model, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a model prepared by FSDP or DeepSpeed, in CPU memory on the main
    process and {} on the others, keyed as the unwrapped model's own state_dict. Collective: every
    process must call it. FSDP goes through torch.distributed.checkpoint, which gathers one tensor at a
    time to the main process's CPU memory, so no GPU ever holds a whole 70B model."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Trained weights from the optimizer's float32 masters: under bf16 the module holds rounded copies, and
        # FILA's exported adapter (B A - B0 A0) would lose the update in their rounding.
        from deepspeed.utils import safe_get_full_fp32_param

        trainable = [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
        masters = {n: safe_get_full_fp32_param(p) for n, p in trainable}   # collective under ZeRO-3
        trained = {n: m.detach().float().cpu() for n, m in masters.items() if m is not None}
        state = {}
        if not trainable_only or len(trained) < len(trainable):
            # The rest as the module holds it (ZeRO-3: needs zero3_save_16bit_model, as in the shipped file).
            state = accelerator.get_state_dict(model) or {}
            state = {k: v.detach().cpu() for k, v in state.items() if not trainable_only or k in masters}
        return {**state, **trained} if is_main() else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=options)
    return state if is_main() else {}


def prepare_reference(accelerator, model):
    """The frozen start model (KL, NPO, SimNPO) laid out like the trained one: sharded under FSDP and ZeRO-3,
    where a whole copy per GPU would not fit, and on the device otherwise. accelerate's
    `prepare_model(evaluation_mode=True)` only moves a model, so the sharding is done here with the
    engine's own functions and the launch configuration's settings."""
    from accelerate.utils import DistributedType

    model.eval().requires_grad_(False)
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version == 2:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            return fsdp2_prepare_model(accelerator, model).eval()
        from torch.distributed.fsdp import FullyShardedDataParallel

        plugin.set_auto_wrap_policy(model)
        return FullyShardedDataParallel(
            model, sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
            auto_wrap_policy=plugin.auto_wrap_policy, mixed_precision=plugin.mixed_precision_policy,
            cpu_offload=plugin.cpu_offload, limit_all_gathers=plugin.limit_all_gathers,
            use_orig_params=plugin.use_orig_params, device_id=accelerator.device).eval()
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import copy

        import deepspeed

        # The training config (its "auto" values filled in by accelerate.prepare), without an optimizer:
        # ZeRO-3 shards the reference's weights; lower stages gain nothing for a model with no gradients.
        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler", "gradient_accumulation_steps", "train_batch_size"):
            config.pop(key, None)
        if config.get("train_micro_batch_size_per_gpu") == "auto":
            config["train_micro_batch_size_per_gpu"] = 1
        stage = config.get("zero_optimization", {}).get("stage", 0)
        config["zero_optimization"] = config["zero_optimization"] if stage == 3 else {"stage": 0}
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()   # DeepSpeedEngine.eval returns None, unlike Module.eval
        return engine
    return model.to(accelerator.device)


def split_evaluation() -> bool:
    """Whether per-item evaluation is divided among processes (several processes, each with all weights)."""
    return rank_world()[1] > 1 and not sharded_engine()


def sum_over_ranks(tensors: Sequence[torch.Tensor]) -> None:
    """In-place sum of each tensor over all processes (NCCL only reduces GPU tensors: CPU ones go through
    the current GPU and back)."""
    import torch.distributed as dist

    if rank_world()[1] == 1:
        return
    gpu_only = dist.get_backend() == "nccl"
    for t in tensors:
        if gpu_only and t.device.type == "cpu":
            tmp = t.cuda()
            dist.all_reduce(tmp)
            t.copy_(tmp.cpu())
        else:
            dist.all_reduce(t)


def map_items(fn: Callable[[list[T]], list[R]], items: Sequence[T]) -> list[R]:
    """fn(items) -> one result per item, with the items divided among processes when `split_evaluation()`
    (accelerate's split_between_processes: each takes a consecutive share) and every process getting all
    results in item order (gather_object). Results must be picklable (floats, strings, dicts of them)."""
    items = list(items)
    if not split_evaluation():
        return fn(items)
    from accelerate import PartialState
    from accelerate.utils import gather_object

    with PartialState(cpu=not torch.cuda.is_available()).split_between_processes(items) as mine:
        results = fn(list(mine))
    if len(results) != len(mine):
        raise RuntimeError(f"map_items: {fn!r} returned {len(results)} results for {len(mine)} items")
    return gather_object(results)


def launched() -> bool:
    """Started by `accelerate launch` / torchrun with more than one process (their WORLD_SIZE variable)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def join_launch() -> None:
    """Join the process group that `accelerate launch` prepared, before any model runs: then evaluation
    before unlearning is split across processes too (`unlearn` would start it only later)."""
    if launched():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def exit_process(code: int) -> NoReturn:
    """Exit with `code`; in a process of a multi-process launch (WORLD_SIZE > 1, process group up), without the
    interpreter's final teardown.

    After the last collective a gloo worker thread still releases that collective's work, and with it the
    tensors' Python objects, which needs the GIL. When the main thread is already tearing the interpreter down,
    Python ends the worker thread inside that C++ destructor and the process aborts: "terminate called without
    an active exception", SIGABRT, the launch exits 1 after a run that finished (seen on loaded machines at
    the end of ZeRO-3 runs). `torch.distributed.destroy_process_group()` does not stop those threads while
    anything still holds the group (every ZeRO-3 parameter does, after the engine is destroyed too). So here,
    once the command has finished: the process group is destroyed (torch's documented teardown, after a clean
    finish only, as a failed rank's peers may still be inside a collective), the threads are joined and the
    exit handlers run as Python's own exit runs them, the streams are flushed, and the process ends with
    os._exit before the teardown, where a worker thread asking for the GIL would abort it."""
    import torch.distributed as dist

    if not (launched() and dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    if code == 0:
        dist.destroy_process_group()
    # What Python's exit does before its teardown, in its order: threading's exit hooks and the join of the
    # non-daemon threads, then the exit handlers (temporary files, file locks, logging, the hub session).
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None and not stream.closed:
            stream.flush()
    os._exit(code)


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    """Wait until every process gets here (no-op in one process)."""
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()
