"""The optimizers and the learning-rate schedule: AdamW (nanoGPT's grouping), Muon for the
transformer blocks' weight matrices with AdamW for everything else, and get_lr.

Muon (Keller Jordan, 2024) is momentum SGD whose update for a 2-D weight matrix is replaced by
the nearest (semi-)orthogonal matrix, approximated by a few quintic Newton-Schulz iterations:
every direction of the update moves by about the same amount. Embeddings, the LM head and all
1-D parameters (norm gains, biases) are not hidden matrices in that sense and stay with AdamW.
"""

from __future__ import annotations

import collections
import copy
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from gptsmith.configurator import UserError
from gptsmith.runtime import Runtime, cpu_has_bf16

# Coefficients of the quintic iteration x -> a x + b x^3 + c x^5 (applied to singular values),
# chosen to pull every value in (0, 1] quickly towards 1 rather than to converge exactly:
# after 5 steps singular values lie roughly in [0.7, 1.2], which is all the update needs.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_BF16_MIN_WIDTH = 256  # below this (on either side) a matrix's iteration stays float32 on a CPU (ns_dtype)


def newton_schulz(
    G: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Approximately orthogonalise G (rows, cols), or each matrix of a stack (n, rows, cols): U V^T
    of its SVD, by a quintic iteration computed in dtype."""
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    stacked = X.dim() == 3
    X = X if stacked else X.unsqueeze(0)  # (n, rows, cols): one path, so a matrix has the same bits alone or stacked
    wide = X.size(-2) <= X.size(-1)
    if not wide:  # iterate on the smaller Gram matrix X X^T
        X = X.mT
    # The spectral norm is at most the Frobenius norm, so all singular values start <= 1.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT  # (n, r, r), r = min(rows, cols)
        # b A + c A A, then a X + B X: each sum scaled inside one batched matmul, three operations an
        # iteration instead of eight (most of the time for the small matrices of CPU recipes).
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    X = X if wide else X.mT
    return (X if stacked else X[0]).to(G.dtype)


def ns_dtype(device: torch.device, shape: torch.Size, setting: str = "auto") -> torch.dtype:
    """What newton_schulz computes a (rows, cols) update in: setting (muon_ns_dtype), or for 'auto'
    bfloat16 on GPUs (as Muon's authors run it: the iteration only needs singular values near 1,
    not exact ones) and on CPUs with bfloat16 units (AMX, AVX-512 BF16) for matrices at least
    NS_BF16_MIN_WIDTH on both sides: 3.2x float32's speed for the calculator's 256-wide matrices on
    a Zen 5 EPYC, only 1.2x for 128-wide ones (the addition recipe's) on an AMX Xeon, so float32 below that
    (and on CPUs without such units, where bfloat16 matmuls are emulated)."""
    if setting != "auto":
        return getattr(torch, setting)
    if device.type != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16() and min(shape[-2:]) >= NS_BF16_MIN_WIDTH else torch.float32


def orthogonalize(updates: list[torch.Tensor], steps: int, setting: str = "auto") -> list[torch.Tensor]:
    """newton_schulz of every update, in ns_dtype: the matrices of one shape go through together, one
    batched matmul per operation (on a CPU too, where small matrices' time goes to launching
    operations more than to arithmetic). With several processes holding the same updates (DDP), each
    computes its share of every shape and the shares are all-gathered, instead of every process
    computing all of them."""
    if not updates:
        return []
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else 1
    rank = torch.distributed.get_rank() if distributed else 0
    by_shape: dict[torch.Size, list[int]] = {}
    for i, u in enumerate(updates):
        by_shape.setdefault(u.shape, []).append(i)
    out: list[torch.Tensor] = [updates[0]] * len(updates)
    for shape, index in by_shape.items():  # the same order on every rank: the collectives pair up
        share = -(-len(index) // world)
        mine = [updates[i] for i in index[rank * share : (rank + 1) * share]]  # none for late ranks of a few
        dtype = ns_dtype(updates[index[0]].device, shape, setting)
        if not mine:
            done = updates[index[0]].new_zeros(0, *shape)
        else:
            done = newton_schulz(torch.stack(mine), steps, dtype=dtype)
        if world > 1:
            done = torch.cat([done, done.new_zeros(share - len(done), *shape)])  # (share, rows, cols) on each rank
            gathered = [torch.empty_like(done) for _ in range(world)]
            torch.distributed.all_gather(gathered, done)
            done = torch.cat(gathered)
        for j, i in enumerate(index):
            out[i] = done[j]
    return out


class Optimizer:
    """The part of torch.optim.Optimizer that Muon and FusedAdamW use: parameter groups filled in
    from defaults, per-parameter state, zero_grad, and state_dict / load_state_dict in torch's
    layout (a checkpoint's optimizer state loads into either). Not torch.optim's class itself:
    building or stepping any torch.optim optimizer imports torch._dynamo, 0.6 s on a 2-vCPU
    machine, a tenth of the CPU speedrun. (optimizer=muon never shards, and FSDP's checkpoints
    are what need torch.optim's class.)"""

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        self.defaults = defaults
        self.state: collections.defaultdict[torch.Tensor, dict[str, Any]] = collections.defaultdict(dict)
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups = [{**defaults, **group, "params": list(group["params"])} for group in groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: parameters numbered through the groups in order, state keyed by number."""
        number: dict[int, int] = {}
        groups = [
            {
                **{k: v for k, v in group.items() if k != "params"},
                "params": [number.setdefault(id(p), len(number)) for p in group["params"]],
            }
            for group in self.param_groups
        ]
        return {"state": {number[id(p)]: state for p, state in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take a state_dict() of this optimizer or of torch.optim's (same groups, same sizes): its state
        moved to each parameter's device (floating tensors in its dtype) and its group settings."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups, strict=True)
        ):
            raise ValueError("the saved optimizer state has other parameter groups than this optimizer")
        params = {n: p for s, g in zip(saved, self.param_groups, strict=True) for n, p in zip(s["params"], g["params"])}
        state: collections.defaultdict[torch.Tensor, dict[str, Any]] = collections.defaultdict(dict)
        for n, values in state_dict["state"].items():
            p = params[n]
            state[p] = {key: _onto(p, key, value) for key, value in values.items()}
        self.state = state
        self.param_groups = [
            {**copy.deepcopy({k: v for k, v in s.items() if k != "params"}), "params": g["params"]}
            for s, g in zip(saved, self.param_groups, strict=True)
        ]


def evaluate_closure(closure: Callable[[], float] | None) -> float | None:
    """The loss a step's closure returns (with gradients on, as torch.optim's steps do), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _onto(p: torch.Tensor, key: str, value: Any) -> Any:
    """A saved state value made ready for p, as torch.optim does: a step count float32 (the fused
    kernels' count lives on the device), other floating tensors in p's dtype, all on p's device."""
    if not isinstance(value, torch.Tensor):
        return value
    if key == "step":
        return value.to(dtype=torch.float32, device=p.device)
    return value.to(dtype=p.dtype, device=p.device) if p.is_floating_point() else value.to(device=p.device)


class Muon(Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D parameters only.

    The step of a (rows, cols) matrix is lr * lr_scale * max(1, rows / cols) ** 0.5 times the
    orthogonalised (Nesterov) momentum; lr_scale lets a schedule written for AdamW's learning
    rate (group["lr"]) drive Muon's larger one. Weight decay is decoupled, as in AdamW.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.02,
        lr_scale: float = 1.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        ns_dtype: str = "auto",
    ) -> None:
        # Not a group setting: optimizer state saved before it existed must still load.
        self.ns_dtype = ns_dtype
        defaults = dict(
            lr=lr, lr_scale=lr_scale, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon updates 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    # Like torch's fused AdamW, Muon takes GradScaler's protocol: before step() the caller may set
    # found_inf (a float tensor on the device, 1 = skip this step) and grad_scale (to divide the
    # gradients by), so a step is skipped on the device and the host never waits to decide it.
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient (none when found_inf is set)."""
        loss = evaluate_closure(closure)
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        skip = None if found_inf is None else found_inf > 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            # Orthogonalised together: batched by shape, shared out between processes.
            momenta = [self._momentum(p, group, skip, grad_scale) for p in params]
            updates = orthogonalize([update for _, update in momenta], group["ns_steps"], self.ns_dtype)
            for p, (buf, _), update in zip(params, momenta, updates, strict=True):
                self._apply(p, group, buf, update, skip)
        return loss

    def _momentum(
        self, p: torch.Tensor, group: dict[str, Any], skip: torch.Tensor | None, grad_scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the new momentum buffer, the (Nesterov) update to orthogonalise) of p. With a skip flag the
        new momentum is kept apart until _apply lets the flag decide; without, it is updated in place."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        grad = p.grad if grad_scale is None else p.grad / grad_scale
        mu, buf = group["momentum"], state["momentum_buffer"]
        buf = buf * mu + grad if skip is not None else buf.mul_(mu).add_(grad)
        return buf, grad.add(buf, alpha=mu) if group["nesterov"] else buf

    def _apply(
        self, p: torch.Tensor, group: dict[str, Any], buf: torch.Tensor, update: torch.Tensor, skip: torch.Tensor | None
    ) -> None:
        """Step p by the orthogonalised update (and decay it); with a skip flag set, keep p and its momentum."""
        lr = group["lr"] * group["lr_scale"]
        # Orthogonal updates have unit singular values; tall matrices get a larger step so the
        # per-element size of the update does not shrink with the number of rows.
        alpha = -lr * max(1.0, p.size(0) / p.size(1)) ** 0.5
        if skip is None:
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=alpha)
            return
        new_p = p * (1 - lr * group["weight_decay"]) if group["weight_decay"] else p
        new_p = torch.add(new_p, update, alpha=alpha)
        old_buf = self.state[p]["momentum_buffer"]  # decided on the device: no wait for the flag
        old_buf.copy_(torch.where(skip, old_buf, buf))
        p.copy_(torch.where(skip, p, new_p))


class FusedAdamW(Optimizer):
    """AdamW through the fused kernel torch.optim.AdamW(fused=True) runs (torch._fused_adamw_), so
    the same bits, on CPUs and CUDA GPUs: Muon's companion for the embeddings, head and gains,
    without the torch._dynamo import that torch.optim costs (see Optimizer)."""

    _step_supports_amp_scaling = True  # GradScaler's found_inf and grad_scale, as in Muon

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW update of every parameter that has a gradient (none, step counts included, when found_inf is set)."""
        loss = evaluate_closure(closure)
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        for group in self.param_groups:
            by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_kind.setdefault((p.device, p.dtype), []).append(p)  # one kernel call per device and dtype
            for (device, _), params in by_kind.items():
                states = [self._state(p) for p in params]
                steps = [state["step"] for state in states]
                flag = None if found_inf is None else found_inf.to(device)
                torch._foreach_add_(steps, 1)
                torch._fused_adamw_(
                    params,
                    [p.grad for p in params],
                    [state["exp_avg"] for state in states],
                    [state["exp_avg_sq"] for state in states],
                    [],
                    steps,
                    amsgrad=False,
                    lr=group["lr"],
                    beta1=group["betas"][0],
                    beta2=group["betas"][1],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=False,
                    grad_scale=None if grad_scale is None else grad_scale.to(device),
                    found_inf=flag,
                )
                if flag is not None:  # a skipped step does not count
                    torch._foreach_sub_(steps, [flag] * len(steps))
        return loss

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:  # torch.optim's layout for its fused kernel: the count a float32 tensor on the device
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state


class CombinedOptimizer:
    """Several optimizers behind one: step, zero_grad, state_dict and a joint param_groups list.

    The training loop sets group["lr"] on every group, and GradScaler unscales every group's
    gradients, so neither needs to know there is more than one optimizer.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = list(optimizers)
        # GradScaler's protocol (see Muon) when every part takes it; step() hands the flags on.
        self._step_supports_amp_scaling = all(getattr(o, "_step_supports_amp_scaling", False) for o in optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, Any]:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Step every optimizer (a closure, if given, is evaluated once)."""
        loss = evaluate_closure(closure)
        for opt in self.optimizers:
            for flag in ("found_inf", "grad_scale"):  # GradScaler deletes them after a step: None then
                setattr(opt, flag, getattr(self, flag, None))
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what state_dict() returned; a plain AdamW state (another optimizer) is refused."""
        states = state_dict.get("optimizers")
        if states is None or len(states) != len(self.optimizers):
            raise ValueError(
                "the optimizer state is not a Muon + AdamW state; resume with the optimizer it was saved with"
            )
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)


def load_moments(optimizer: torch.optim.Optimizer | CombinedOptimizer, load: Callable[[], None]) -> list[str]:
    """Run load() (which fills the optimizer from a checkpoint), keeping this run's hyper-parameters.

    load_state_dict restores the saved param groups too (betas, weight_decay, momentum, ns_steps,
    ...), so a changed setting would silently do nothing on resume: the checkpoint gives the
    moments, the run's configuration the settings. Returns the settings that differ from the
    checkpoint's, as 'name old -> new' (lr excepted: the schedule sets it at every step).
    """
    ours = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    load()
    changed = []
    for group, settings in zip(optimizer.param_groups, ours, strict=True):
        for key, value in settings.items():
            saved = group.get(key)
            if key not in ("lr", "initial_lr") and saved != value and f"{key} {saved} -> {value}" not in changed:
                changed.append(f"{key} {saved} -> {value}")
        group.update(settings)
    return changed


def muon_param_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's, AdamW's) parameters: the 2-D matrices inside transformer blocks vs everything else."""
    muon, adamw, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # a tied matrix appears once
            continue
        seen.add(id(p))
        (muon if p.dim() == 2 and ".h." in f".{name}" else adamw).append(p)
    return muon, adamw


def adamw(
    params: Any,
    weight_decay: float,
    learning_rate: float,
    betas: tuple[float, float],
    device_type: str,
    own: bool = False,
) -> torch.optim.AdamW | FusedAdamW:
    """AdamW decaying only matrices (>= 2-D: weights, embeddings), not biases and norm gains;
    the fused kernel where this torch has one for the device. own: gptsmith's FusedAdamW there
    (the same bits without importing torch._dynamo), where nothing needs torch.optim's class."""
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    if own and fused:
        return FusedAdamW(groups, lr=learning_rate, betas=betas)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None)


def configure_muon(
    model: nn.Module,
    weight_decay: float,
    learning_rate: float,
    betas: tuple[float, float],
    device_type: str,
    muon_lr: float = 0.02,
    muon_momentum: float = 0.95,
    ns_steps: int = 5,
    ns_dtype: str = "auto",
) -> CombinedOptimizer:
    """Muon (peak lr muon_lr) for block matrices, AdamW (peak learning_rate) for the rest; one schedule drives both."""
    muon_params, adamw_params = muon_param_split(model)
    muon = Muon(
        muon_params,
        lr=learning_rate,
        lr_scale=muon_lr / learning_rate,
        momentum=muon_momentum,
        ns_steps=ns_steps,
        weight_decay=weight_decay,
        ns_dtype=ns_dtype,
    )
    # Muon runs never shard (FSDP needs whole matrices), so nothing needs torch.optim's AdamW here.
    return CombinedOptimizer(muon, adamw(adamw_params, weight_decay, learning_rate, betas, device_type, own=True))


def build_optimizer(model: nn.Module, settings: dict[str, Any], device_type: str) -> Any:
    """The optimizer a training config (or its record in a checkpoint, settings) asks for: keys
    optimizer, weight_decay, learning_rate, beta1, beta2, muon_lr, muon_momentum, muon_ns_steps, muon_ns_dtype."""
    common = dict(
        weight_decay=settings.get("weight_decay", 0.1),
        learning_rate=settings.get("learning_rate", 6e-4),
        betas=(settings.get("beta1", 0.9), settings.get("beta2", 0.95)),
        device_type=device_type,
    )
    if settings.get("optimizer", "adamw") == "muon":  # Muon for the blocks' matrices, AdamW for the rest
        return configure_muon(
            model,
            **common,
            muon_lr=settings.get("muon_lr", 0.02),
            muon_momentum=settings.get("muon_momentum", 0.95),
            ns_steps=settings.get("muon_ns_steps", 5),
            ns_dtype=settings.get("muon_ns_dtype", "auto"),
        )
    return adamw(model.parameters(), **common)


# Devices whose tensors the host reads without waiting for anything (no queue of kernels to drain):
# there step_unless reads the flag and the optimizers keep their plain in-place updates.
# (Tests empty it to run the GPU's path on a CPU.)
HOST_READABLE = {"cpu"}


class MasterWeights:
    """bfloat16 copies of a float32 model's weights for forward and backward, so that the residual
    stream and every activation are bfloat16 too, instead of autocast casting the float32 weights
    again at every micro-step. The model keeps the float32 weights: the optimizer, gradient clipping
    and checkpoints see only them. Each copy's gradient is added into its master's (in float32, so
    micro-steps accumulate without bfloat16 rounding) as soon as backward produces it, and sync()
    refreshes the copies after each optimizer step."""

    def __init__(self, model: nn.Module) -> None:
        # The same modules, tied weights still tied, each parameter copied straight into bfloat16
        # (deepcopy takes the copies from its memo), never a second float32 model first.
        # Parameters only: the rotary tables stay float32.
        memo = {id(p): nn.Parameter(p.detach().to(torch.bfloat16), p.requires_grad) for p in model.parameters()}
        self.compute = copy.deepcopy(model, memo)
        self.masters = list(model.parameters())
        self.copies = list(self.compute.parameters())
        for master, low in zip(self.masters, self.copies, strict=True):
            low.register_post_accumulate_grad_hook(functools.partial(_add_grad_to, master))

    @torch.no_grad()
    def sync(self) -> None:
        """Round the master weights into the bfloat16 copies (after an optimizer step or a restore)."""
        torch._foreach_copy_(self.copies, self.masters)


def master_weights(model: nn.Module, rt: Runtime) -> MasterWeights:
    """The bfloat16 copies a run trains through (master_weights=True), once dtype=auto has chosen:
    it may have chosen float32 for this model on this machine."""
    if rt.dtype != "bfloat16":
        raise UserError(f"master_weights=True needs bfloat16, but this run computes in {rt.dtype}")
    if rt.distributed:
        raise UserError("master_weights=True runs in one process; under DDP leave it off (parallel=fsdp has its own)")
    rt.weights_in_dtype = True  # no autocast: the copies are bfloat16 already
    return MasterWeights(model)


def _add_grad_to(master: torch.Tensor, low: torch.Tensor) -> None:
    if master.grad is None:
        master.grad = low.grad.float()
    else:
        master.grad.add_(low.grad)
    low.grad = None


def step_unless(optimizer: Any, skip: torch.Tensor) -> None:
    """optimizer.step() unless skip (a bool tensor on the device) is set, without making the host
    wait for the device where the optimizer takes GradScaler's found_inf (fused AdamW, Muon, both
    combined): the kernels read the flag and leave weights, moments and step counts as they were.
    Other optimizers (AdamW where this torch has no fused kernel for the device) read skip: a sync."""
    if skip.device.type in HOST_READABLE or not getattr(optimizer, "_step_supports_amp_scaling", False):
        if not skip.item():
            optimizer.step()
        return
    optimizer.found_inf = skip.float()
    try:
        optimizer.step()
    finally:
        optimizer.found_inf = None


def get_lr(it: int, cfg: Any) -> float:
    """Learning rate at step it: linear warmup (nonzero at step 0), then cosine decay to min_lr at
    lr_decay_iters, or (wsd) constant until decay_start = max(warmup_iters, lr_decay_iters -
    int(decay_frac * lr_decay_iters)) and linear from learning_rate there to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        decay_start = max(cfg.warmup_iters, cfg.lr_decay_iters - int(cfg.decay_frac * cfg.lr_decay_iters))
        if it < decay_start:
            return cfg.learning_rate
        ratio = (it - decay_start) / (cfg.lr_decay_iters - decay_start)  # 0 -> 1
        return cfg.learning_rate + ratio * (cfg.min_lr - cfg.learning_rate)
    ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)
