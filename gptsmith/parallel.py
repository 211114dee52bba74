"""Training on several processes: DDP or FSDP2 wrapping, gradient sync, activation checkpointing.

DDP keeps a full copy of the weights, gradients and optimizer state on every process and
averages gradients after backward. FSDP2 (fully_shard) splits all three over the processes
and gathers each block's weights just in time for its forward and backward, so a model
whose training state (16 bytes per parameter with AdamW) does not fit one GPU still trains;
a new model is built on the meta device and each process draws only its shards (materialize).
Activation checkpointing trades compute for memory: each block keeps only its input and
recomputes the rest during backward.
"""

from __future__ import annotations

import functools
import math
import sys
import types
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.utils.checkpoint

from gptsmith.configurator import UserError
from gptsmith.model import GPT
from gptsmith.runtime import Runtime

MODES = ("ddp", "fsdp")


def check_mode(parallel: str, dtype: str) -> None:
    """Refuse a parallel mode we do not have, or a dtype FSDP cannot train in here."""
    if parallel not in MODES:
        raise UserError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")
    if parallel == "fsdp" and dtype == "float16":
        # float16 needs loss scaling, which we do not support on sharded (DTensor) gradients; bfloat16 needs none.
        raise UserError("parallel=fsdp does not support dtype=float16; use --dtype=bfloat16 or --dtype=float32")


def checkpoint_activations(model: GPT) -> None:
    """Make every transformer block recompute its activations in backward instead of storing them.

    The block's own forward is replaced on the instance, so parameter names (and checkpoints)
    stay exactly as without checkpointing.
    """
    for block in model.transformer.h:
        # A method bound to the block, so that a copy of the model (copy.deepcopy: master_weights'
        # bfloat16 copies) recomputes its own blocks, not the original's.
        block.forward = types.MethodType(_recomputed_forward, block)


def _recomputed_forward(block: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    forward = functools.partial(type(block).forward, block)
    if not torch.is_grad_enabled():  # evaluation and sampling have no backward to save memory for
        return forward(*args, **kwargs)
    # Non-reentrant checkpointing works with FSDP's hooks and torch.compile, and it restores the
    # RNG state for the recomputation, so dropout draws the same masks twice.
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def shard(model: GPT, rt: Runtime) -> None:
    """FSDP2: shard each transformer block, then the rest (embeddings, final norm, tied head), in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(rt.device_type, (rt.world_size,))
    policy = MixedPrecisionPolicy()
    if rt.dtype == "bfloat16":
        # Compute in bfloat16 but reduce gradients and keep the sharded master weights in float32.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = list(model.transformer.h)
    for i, block in enumerate(blocks):
        # The last block's backward starts right after its forward: gathering its weights again
        # at once would be wasted traffic, so it keeps them (as the root does, below).
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    # The root holds wte and lm_head (one tied parameter), used first and last in forward and
    # first in backward: kept gathered between them.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def materialize(model: GPT, rt: Runtime, seed: int) -> None:
    """Give a model built on the meta device, then sharded, its weights: each process allocates only
    its shards and fills them with exactly what GPT(config) draws on the CPU after
    torch.manual_seed(seed), so an FSDP run starts where a one-process run does (tested), while no
    process ever holds more than one module's full weights (the largest: the token embedding).

    Every initialiser is re-run on full-size CPU tensors standing in for one module's parameters,
    in the order and with the draws of the constructor: first each module's own reset_parameters
    (nn.Linear's uniform draws, which GPT's initialisation then overwrites but which move the random
    stream), then GPT.init_weights; after each, the process keeps its shard of every tensor it set.
    The stand-ins start as NaN rather than as the gathered current values: nothing is communicated,
    and a parameter an initialiser left alone (all NaN) keeps its shard as it was."""
    model.to_empty(device=rt.device)
    torch.manual_seed(seed)

    def on_full_tensors(module: torch.nn.Module, init: Callable[[], None], every: bool = False) -> None:
        shards = dict(module.named_parameters(recurse=False))
        if not shards:
            return
        # On the CPU, whose random stream GPT(config) draws from.
        full = {
            name: torch.nn.Parameter(torch.full(p.shape, math.nan, dtype=p.dtype), requires_grad=False)
            for name, p in shards.items()
        }
        module._parameters.update(full)
        try:
            init()
        finally:
            module._parameters.update(shards)
        for name, p in shards.items():
            value = full[name].data
            unset = value.isnan()
            if unset.all() and not every:
                continue
            if unset.any():
                what = "part of" if not unset.all() else "nothing of"
                raise RuntimeError(f"{type(module).__name__}'s initialiser set {what} its parameter {name!r}")
            # Every process holds the same full tensor and cuts its own rows: fully_shard splits dim 0
            # as torch.chunk does, ceil(rows / world) each, the last ones shorter or empty.
            local, rows = p.to_local(), value.size(0)
            start = min(p.device_mesh.get_local_rank() * -(-rows // p.device_mesh.size()), rows)
            local.copy_(value[start : start + local.size(0)])

    with torch.no_grad():
        for module in model.modules():  # the order in which GPT.__init__ constructs them
            if hasattr(module, "reset_parameters"):  # must set all (the shards hold to_empty's garbage)
                on_full_tensors(module, module.reset_parameters, every=True)
            elif any(True for _ in module.parameters(recurse=False)):
                raise TypeError(f"{type(module).__name__} has parameters but no reset_parameters to initialise them")
        model.init_weights(run=on_full_tensors)
    model.init_buffers()


def load_from_first(model: GPT, weights: dict[str, torch.Tensor], rt: Runtime) -> None:
    """Give a model built on the meta device, then sharded, the full weights rank 0 holds (weights: its
    state dict there, {} elsewhere): rank 0 broadcasts them one tensor at a time and each rank keeps its
    shard, so no other rank ever holds the whole model (torch.distributed.checkpoint's
    broadcast_from_rank0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=rt.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    model.init_buffers()  # the rotary tables, not in the state dict


def wrap_ddp(model: torch.nn.Module, rt: Runtime, static_graph: bool = True) -> torch.nn.Module:
    """DistributedDataParallel: rank 0's weights are broadcast, gradients averaged in backward.

    gradient_as_bucket_view: the gradients live in DDP's communication buckets instead of being
    copied in and out (less memory, fewer copies). static_graph: every step uses the same
    parameters in the same order (true of this model), so DDP learns the order once and skips
    its per-step search for unused parameters; not valid with activation checkpointing, whose
    recomputation fires the gradient hooks in another pattern (DDP's reducer then asserts)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(
        model,
        device_ids=[rt.local_rank] if rt.device_type == "cuda" else None,
        gradient_as_bucket_view=True,
        static_graph=static_graph,
    )
    rt.before_teardown.append(functools.partial(release_reducer, ddp))
    return ddp


def release_reducer(ddp: torch.nn.Module) -> None:
    """Free DDP's reducer (and the logger that holds it) while the process group is still registered.

    The reducer is a C++ object holding the group. Were it the group's last holder, the group's
    destructor would run inside the reducer's, with the GIL held, and wait for gloo's worker
    threads, while one of them may be waiting for the GIL to drop the Python tensors of a finished
    collective: a deadlock (seen at the end of a 2-process run). A group whose last holder is its
    Python object is destroyed with the GIL released, so teardown drops the reducer first."""
    for name in ("logger", "reducer"):
        if name in ddp.__dict__:
            delattr(ddp, name)


def compile_blocks(model: GPT, mode: str = "default") -> None:
    """torch.compile each transformer block in place, before FSDP shards it: compiling the sharded
    root instead leaves dynamo falling back to eager around FSDP's hooks. Parameter names stay."""
    for block in model.transformer.h:
        block.compile(mode=mode, fullgraph=True, dynamic=False)


def grad_sync(model: torch.nn.Module, raw_model: torch.nn.Module, mode: str | None, sync: bool) -> Any:
    """Context for one micro-step's forward and backward: gradients are averaged over the
    processes only when sync is True (the last micro-step), otherwise they just accumulate.

    mode is None for a single process, else 'ddp' (model is the DDP wrapper) or 'fsdp'
    (raw_model is the sharded model, model perhaps its torch.compile wrapper).
    """
    if mode == "ddp" and not sync:
        return model.no_sync()
    if mode == "fsdp":
        raw_model.set_requires_gradient_sync(sync)  # FSDP2's no_sync: skip the reduce-scatter
    return nullcontext()


def full_value(x: torch.Tensor) -> torch.Tensor:
    """The full value of a DTensor (under FSDP, the gradient norm) as a plain tensor; others as they are.
    Without FSDP torch.distributed.tensor is never imported (0.6 s on a 2-vCPU machine), and then
    no tensor can be a DTensor."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return x.full_tensor() if dtensor is not None and isinstance(x, dtensor.DTensor) else x
