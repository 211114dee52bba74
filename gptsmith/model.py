"""A GPT language model in one file, importing only torch.

The default configuration is GPT-2: learned position embeddings, pre-LayerNorm
blocks, a GELU MLP and a weight-tied head, so OpenAI's GPT-2 weights load into it
(GPT.from_pretrained, which imports transformers only when called). GPTConfig also
offers, all off by default: rotary position embeddings, RMSNorm, ReLU^2 or SwiGLU MLPs,
QK-norm, grouped-query attention, an untied head and logit soft-capping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    """Architecture hyper-parameters; everything a checkpoint needs to rebuild the model."""

    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as in GPT-2
    gelu_approximate: str = "none"  # nn.GELU's approximate: OpenAI's GPT-2 weights were trained with "tanh"
    # Modern options; the defaults are GPT-2's, so older checkpoints (without these keys) load unchanged.
    pos_emb: str = "learned"  # 'learned' (a wpe table) or 'rope' (rotary, applied to q and k per head)
    norm: str = "layernorm"  # 'layernorm' or 'rmsnorm' (no bias, no mean subtraction)
    activation: str = "gelu"  # 'gelu' (4x wide), 'relu2' (ReLU squared, 4x wide) or 'swiglu' (see MLP)
    qk_norm: bool = False  # RMSNorm on each head's q and k before attention
    n_kv_head: int | None = None  # key/value heads for grouped-query attention; None = n_head
    tie_weights: bool = True  # the token embedding is also the output layer
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0 = off

    def __post_init__(self) -> None:
        """Refuse option values and combinations the model cannot build, with a message saying why."""
        choices = {
            "pos_emb": ("learned", "rope"),
            "norm": ("layernorm", "rmsnorm"),
            "activation": ("gelu", "relu2", "swiglu"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        if self.n_head <= 0 or self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_head is not None and not (0 < self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0):
            raise ValueError(
                f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}): each key/value head serves "
                "n_head / n_kv_head query heads"
            )
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"pos_emb='rope' needs an even head size, got n_embd / n_head = {self.n_embd // self.n_head}: "
                "rotary embeddings rotate pairs of channels"
            )
        if not self.logit_softcap >= 0:
            raise ValueError(f"logit_softcap must be >= 0 (0 = off), got {self.logit_softcap}")

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used (n_head unless grouped-query attention)."""
        return self.n_kv_head or self.n_head

    def is_gpt2(self) -> bool:
        """Whether every modern option is at its GPT-2 default, so the model is a plain GPT-2."""
        return (
            self.pos_emb,
            self.norm,
            self.activation,
            self.qk_norm,
            self.kv_heads,
            self.tie_weights,
            self.logit_softcap,
        ) == ("learned", "layernorm", "gelu", False, self.n_head, True, 0.0)


# GPTConfig's modern options, which config.ModelKeys carries over by name.
MODEL_OPTIONS = ("pos_emb", "norm", "activation", "qk_norm", "n_kv_head", "tie_weights", "logit_softcap")


ROPE_BASE = 10000.0  # the rotary base of RoFormer and LLaMA


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm with its gain in the input's dtype: under CPU autocast q and k reach QK-norm in
    bfloat16 while the gain is float32, and torch then falls back to a slow unfused kernel (with a
    warning). In float32 this is nn.RMSNorm exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    """The configured normalisation over the last dimension of size dim."""
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps=1e-5)
    return nn.LayerNorm(dim, bias=config.bias)


def rope_tables(length: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables apply_rope takes, each (length, head_size): position t turns channel pair
    (i, i + hs/2) by t * base^(-2i/hs); cos holds [cos, cos] of those angles, sin [-sin, sin]."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, hs/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by its positions' angles (rope_tables, sliced to (T, hs)); channel i pairs
    with channel i + hs/2 (GPT-NeoX layout): (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
    Written as x * cos + (x2, x1) * sin over whole heads, two multiplies instead of four on half-width
    strided views: twice as fast on a CPU for a small model, and the same bits forward (a - b == a + (-b))."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (T, hs), broadcast over batch and heads
    return x * cos + torch.cat((x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of every layer for max_len positions, allocated once at full size.

    Nothing here ever changes shape: positions are written by index (in the decode step the index
    is a device tensor, not a Python int), and the attention masks out positions not written yet
    (or left over from before a window restart). So one token's step has the same shapes at every
    position, compiles once and can be replayed as a CUDA graph (GPT.decode_one_token).
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.max_len = max_len
        shape = (n_layer, batch_size, n_kv_head, max_len, head_size)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (n_layer, B, n_kv, max_len, hs)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, n_kv, T, hs) of a fresh window at positions 0 .. T-1 (T a Python int: prefill
        shapes vary anyway, and it runs once per window)."""
        T = k.size(2)
        self.k[layer, :, :, :T] = k  # copy_ casts to the cache's dtype
        self.v[layer, :, :, :T] = v

    def update(
        self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hs) at the positions pos (T,), a long tensor on the cache's device;
        return all of the layer's keys and values, (B, n_kv, max_len, hs) each, for a masked attention."""
        # Written by a position tensor, so the same code (and graph) serves every position. One index_put_
        # into the whole cache, layer and positions both indexed: writing through the layer's view instead
        # (self.k[layer].index_copy_) makes torch.compile copy the layer's cache out and the whole cache back
        # at every step. Advanced indices apart put their dimension first: the values are (T, B, n_kv, hs).
        at = (torch.full_like(pos, layer), slice(None), slice(None), pos)
        self.k[at] = k.to(self.k.dtype).permute(2, 0, 1, 3)  # index_put_ does not cast
        self.v[at] = v.to(self.v.dtype).permute(2, 0, 1, 3)
        return self.k[layer], self.v[layer]

    def mask(self, pos: torch.Tensor) -> torch.Tensor:
        """(T, max_len) bool: the query at position pos[i] sees the keys at positions <= pos[i], causal
        attention that also hides the positions not written yet."""
        return torch.arange(self.max_len, device=pos.device) <= pos[:, None]


class Dropout(nn.Dropout):
    """nn.Dropout; on a CPU the mask is dropout_mask's, drawn about 3x faster than torch.rand's and
    5x faster than bernoulli_'s (whose masks had been 45% of a bfloat16 training step of
    config/shakespeare_char.py, dropout 0.2, there). Elsewhere F.dropout (fused on GPUs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training), with Dropout's cheaper mask on a CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p == 1.0:
        return F.dropout(x, p, training)
    return x * dropout_mask(x.detach(), p)


# The operator's namespace is this module's name, so that a copy of this file imported beside it
# (model files get copied) registers its own operator instead of failing on a taken name.
@torch.library.custom_op(f"{__name__.replace('.', '_')}::dropout_mask", mutates_args=())
def dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """A dropout mask shaped like `like`: 0 with chance p (taken to 16 bits), else 1 / (1 - p).

    Drawing the random numbers is most of dropout's cost on a CPU, one generator call per number
    for torch.rand or bernoulli_; here one 64-bit draw gives four 16-bit numbers, about 3x faster
    than rand >= p. An operator of its own, so that torch.compile calls it rather than tracing into it:
    inductor's CPU kernels would draw the numbers one at a time again (and then compiled steps
    would not draw the eager steps' masks)."""
    n, dropped = like.numel(), min(round(p * 65536), 65535)  # 16-bit numbers below `dropped` drop
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_(-(2**63), 2**63 - 1)
    keep = draws.view(torch.int16)[:n].view(like.shape) >= dropped - 32768  # int16 is uint16 - 32768
    # In like's dtype, scaled: inductor's CPU kernels multiply by a boolean mask more slowly.
    return keep.to(like.dtype) * (1.0 / (1.0 - p))  # F.dropout's scale


@dropout_mask.register_fake
def _(like: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty_like(like)


def causal_attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
    """Causal attention (B, nh, T, hs) with dropout on the attention weights, written out. On a CPU,
    scaled_dot_product_attention with dropout leaves its flash kernel for a math path that gains
    nothing from bfloat16 (as slow as float32) and draws its mask with bernoulli_; written out, the
    matmuls run in the autocast dtype and the mask is dropout()'s: a bfloat16 training step of
    config/shakespeare_char.py ran 1.5x faster (docs/benchmarks.md)."""
    T, group = q.size(-2), q.size(1) // k.size(1)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    att = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = dropout(att.masked_fill(~causal, float("-inf")).softmax(dim=-1), p)
    return att @ v  # (B, nh, T, hs)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """scaled_dot_product_attention of q (B, nh, T, hs) over k and v (B, n_kv, S, hs), causal without
    a mask; each key/value head serves nh / n_kv query heads (enable_gqa: k and v are not copied
    nh / n_kv times first).
    On a CPU in float32 whatever the compute dtype: torch's CPU attention kernels in bfloat16 run
    1.5-4x slower than in float32 at this project's head sizes (a Zen 5 EPYC, docs/benchmarks.md),
    which made bfloat16 autocast lose on small models; the casts around it cost little."""
    dtype = q.dtype
    upcast = q.device.type == "cpu" and (dtype != torch.float32 or torch.is_autocast_enabled("cpu"))
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    with torch.autocast("cpu", enabled=False) if upcast else nullcontext():
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p, enable_gqa=k.size(1) != q.size(1)
        )
    return y.to(dtype) if upcast else y


class CausalSelfAttention(nn.Module):
    """All heads at once: one fused QKV projection, heads as a batch dimension."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.n_kv_head, self.head_size = config.kv_heads, config.n_embd // config.n_head
        # q has n_head heads, k and v n_kv_head each (all three n_head wide without grouped-query attention).
        kv_dim = self.n_kv_head * self.head_size
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)
        self.q_norm = RMSNorm(self.head_size, eps=1e-5) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_size, eps=1e-5) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C). With a cache: pos None stores a fresh window's keys and values (prefill); else
        pos (T,) are x's positions after the cached ones and mask (T, max_len) what each query sees."""
        B, T, C = x.size()
        hs, kv_dim = self.head_size, self.n_kv_head * self.head_size
        q, k, v = self.c_attn(x).split([self.n_embd, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # the angles of these T absolute positions, so cached keys keep theirs
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None and pos is None:  # prefill: nothing cached before these T positions
            cache.prefill(layer, k, v)
        elif cache is not None:  # over the whole cache, masked: the same shapes at every position
            k, v = cache.update(layer, pos, k, v)  # (B, n_kv, max_len, hs)
            # In q's dtype, a no-op unless the cache's is not the compute dtype: FSDP's bfloat16 parameters
            # (no autocast to cast them), or float32 q and k after autocast's float32 qk_norm.
            k, v = k.to(q.dtype), v.to(q.dtype)
        # Without a mask (no cache, or prefill) the causal attention among these T positions: the flash
        # path on GPUs.
        p_drop = self.dropout if self.training else 0.0
        if p_drop and mask is None and q.device.type == "cpu":
            y = causal_attention_with_dropout(q, k, v, p_drop)
        else:
            y = attention(q, k, v, mask=mask, dropout_p=p_drop)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


def swiglu_hidden(n_embd: int) -> int:
    """SwiGLU's hidden width: 8/3 * n_embd rounded up to a multiple of 64, so its three matrices
    hold about as many parameters as the 4x two-matrix MLP (3 * 8/3 = 2 * 4)."""
    return -(-8 * n_embd // (3 * 64)) * 64


class MLP(nn.Module):
    """Position-wise feed-forward network: 4x wide with GELU or ReLU^2, or SwiGLU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.activation = config.activation
        hidden = swiglu_hidden(config.n_embd) if config.activation == "swiglu" else 4 * config.n_embd
        # SwiGLU's gate and up projections are fused into c_fc, as q, k and v are in c_attn.
        width = 2 * hidden if config.activation == "swiglu" else hidden
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu_approximate) if config.activation == "gelu" else None
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, width)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)  # (B, T, hidden) each
            h = F.silu(gate) * up
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = self.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache=cache, layer=layer, rope=rope, pos=pos, mask=mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The GPT language model: embeddings, a stack of blocks, a final norm and a (tied) head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.vocab_size > 0 and config.block_size > 0
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(
            drop=Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        )
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:  # the same matrix embeds tokens and scores them
            self.transformer.wte.weight = self.lm_head.weight
        self.decode_graphs: str | None = None  # how decode_next runs as a CUDA graph, if it does (compile_decode)
        self._kept_cache: tuple[tuple[Any, ...], KVCache] | None = None  # kv_cache's, for the CUDA graph
        self._kept_graph: tuple[tuple[Any, ...], DecodeGraph] | None = None  # decode_graph's
        if config.pos_emb == "rope":
            # Not persistent: computed from the config, so checkpoints hold the same keys as without rope.
            hs = config.n_embd // config.n_head
            self.register_buffer("rope_cos", torch.empty(config.block_size, hs), persistent=False)
            self.register_buffer("rope_sin", torch.empty(config.block_size, hs), persistent=False)
        self.init_buffers()
        self.init_weights()

    def init_buffers(self) -> None:
        """Compute the rotary tables into their buffers (again after to_empty: see init_weights)."""
        if self.config.pos_emb == "rope":
            cos, sin = rope_tables(self.config.block_size, self.config.n_embd // self.config.n_head)
            with torch.no_grad():
                self.rope_cos.copy_(cos)  # (block_size, hs)
                self.rope_sin.copy_(sin)

    def init_weights(self, run: Callable[[nn.Module, Callable[[], None]], None] | None = None) -> None:
        """GPT-2's initialisation, one module at a time. run(module, init) calls init(), which sets the
        module's own parameters; a model built on the meta device and sharded passes a run that calls
        it on full-size CPU tensors and keeps each process's shard (gptsmith.parallel.materialize)."""
        run = run or (lambda module, init: init())

        def init_module(module: nn.Module) -> None:
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

        # In apply's order (each module after its children); only linear layers and embeddings are set here.
        self.apply(lambda m: run(m, lambda: init_module(m)) if isinstance(m, (nn.Linear, nn.Embedding)) else None)
        # GPT-2 scales the projections into the residual stream by 1/sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth.
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if name.endswith("c_proj"):
                run(module, lambda module=module: nn.init.normal_(module.weight, mean=0.0, std=std))

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without embedding tables that are only looked up: the
        position embeddings, and the token embedding when untied (tied, it is also the output layer)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.transformer.wte.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_logits: bool = True,
        pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits, loss). Targets of -1 are left out of the loss.
        Without targets only the last position's logits are computed, (B, 1, vocab).
        With targets and return_logits=False: (None, loss), and where the (B*T, vocab) float32 logits
        would be big (CHUNKED_LOSS_BYTES) the head and the loss run chunk by chunk, never holding them.

        With a cache (see prefill and decode_one_token): pos None makes idx a fresh window at positions
        0 .. T-1, whose keys and values are stored; pos (T,), a long tensor on idx's device, gives the
        positions of idx's tokens after the cached ones (each < cache.max_len: a tensor's values are not
        checked here, as that would wait for the device)."""
        B, T = idx.size()
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        if pos is not None and cache is None:
            raise ValueError("pos gives positions after cached ones: it needs a cache")
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device) if pos is None else pos)  # (T, C)
        elif pos is None:  # rotary: the angles of the absolute positions 0 .. T-1
            rope = (self.rope_cos[:T], self.rope_sin[:T])  # (T, hs) each
        else:  # indexed by the position tensor, not sliced by a Python int: the same graph at every position
            rope = (self.rope_cos[pos], self.rope_sin[pos])  # (T, hs) each
        mask = cache.mask(pos) if pos is not None else None  # (T, max_len), once for all layers
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache=cache, layer=i, rope=rope, pos=pos, mask=mask)
        x = self.transformer.ln_f(x)
        if targets is None:
            # A slice, not x[:, [-1], :]: indexing by a Python list copies the list to the device, a sync.
            return self._head(x[:, -1:, :]), None  # (B, 1, vocab): sampling needs no more
        if not return_logits and x.numel() // x.size(-1) * self.config.vocab_size * 4 > CHUNKED_LOSS_BYTES:
            flat = x.reshape(-1, x.size(-1))  # (B*T, C)
            return None, chunked_head_loss(flat, self.lm_head.weight, targets.reshape(-1), self.config.logit_softcap)
        logits = self._head(x)  # (B, T, vocab)
        return logits if return_logits else None, masked_cross_entropy(logits, targets)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of x (B, T, C), soft-capped to (-cap, cap) when logit_softcap is set."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        if cap:  # in float32: tanh saturates early in bfloat16
            logits = cap * torch.tanh(logits.float() / cap)
        return logits

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context window, e.g. to finetune GPT-2 (1024) with a smaller block."""
        assert 0 < block_size <= self.config.block_size
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        else:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]

    @classmethod
    def from_pretrained(cls, name_or_path: str, override_args: dict[str, Any] | None = None) -> GPT:
        """OpenAI's GPT-2 weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl from the hub) or a local
        Hugging Face GPT-2 folder, as in nanoGPT; ValueError if unusable. The conversion lives in
        gptsmith.hf, which needs transformers."""
        from gptsmith.hf import load_gpt2  # imported here so that the model itself needs nothing but torch

        return load_gpt2(name_or_path, override_args)

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """nanoGPT's AdamW: decaying only matrices (>= 2-D), not biases and norm gains (gptsmith.optim)."""
        from gptsmith.optim import adamw

        return adamw(self.parameters(), weight_decay, learning_rate, betas, device_type)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B.

        The parameter term counts every matrix a token is multiplied by (so grouped-query attention
        and SwiGLU enter through their sizes); the attention term is per query head."""
        cfg = self.config
        n, hs = self.get_num_params(), cfg.n_embd // cfg.n_head
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * hs * cfg.block_size

    def estimate_mfu(self, tokens_per_sec: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
        return self.flops_per_token() * tokens_per_sec / peak_flops

    def kv_cache(self, batch_size: int) -> KVCache:
        """An empty cache for batch_size sequences of up to block_size positions, on the model's device, in
        the dtype of the keys and values: autocast's when it is on (as for torch.autocast's bfloat16), else
        the weights'."""
        cfg, weight = self.config, self.lm_head.weight
        device_type = weight.device.type
        on = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if on else weight.dtype
        hs = cfg.n_embd // cfg.n_head
        if not self.decode_graphs:
            return KVCache(cfg.n_layer, batch_size, cfg.kv_heads, cfg.block_size, hs, dtype, weight.device)
        # The CUDA graph writes into the cache in place. Marked static, the cache is used where it lies: not
        # copied into the graph's own memory at every replay, nor the graph skipped for mutating an input.
        # And it is kept for the next call (what it holds is overwritten or masked out), as a cache at a new
        # address would make the graph be recorded again. An inference-mode tensor can be written only in
        # inference mode, hence that in the key.
        key = (batch_size, dtype, weight.device, torch.is_inference_mode_enabled())
        if self._kept_cache is None or self._kept_cache[0] != key:
            cache = KVCache(cfg.n_layer, batch_size, cfg.kv_heads, cfg.block_size, hs, dtype, weight.device)
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
            self._kept_cache = (key, cache)
        return self._kept_cache[1]

    def prefill(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """A fresh window idx (B, T) at positions 0 .. T-1: store its keys and values in the cache and return the
        logits of the token after it, (B, vocab) float32. Nothing is cached before it, so its attention is the
        plain causal one among its T positions (the flash path on GPUs). Its shapes vary with T, so it runs
        uncompiled: once per window, not per token."""
        logits, _ = self(idx, cache=cache)  # (B, 1, vocab)
        return logits[:, -1, :].float()

    def decode_one_token(self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The decode step: idx (B, 1), the newest token, at position pos (a (1,) long tensor on its device),
        after the cached positions -> the logits of the token after it, (B, vocab) float32; its keys and
        values join the cache.

        Its shapes are the same at every position (the position is a tensor, and the attention runs over
        the whole cache, masked), and it never waits for the device (no .item(), no branch on a tensor's
        value)."""
        logits, _ = self(idx, cache=cache, pos=pos)  # (B, 1, vocab)
        return logits[:, -1, :].float()

    def decode_next(
        self,
        idx: torch.Tensor,
        pos: torch.Tensor,
        cache: KVCache,
        temperature: float,
        top_k: int | None,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        """decode_one_token and the choice of the next token from its logits (B, 1): what generate runs for
        every token after a prefill, compiled as one graph by compile_decode (a CUDA graph on GPUs), the
        sampling's arithmetic included. Only the noise (sampling_noise) is drawn outside, where the
        caller's torch.Generator can draw it, which a compiled graph cannot; so the tokens are those of
        sample_next(decode_one_token(...)) for the same generator. Compiled with CUDA graphs, the token
        returned is overwritten by the next call: copy it before that (generate does)."""
        return choose_next(self.decode_one_token(idx, pos, cache), temperature, top_k, noise)

    def cast_for_inference(self, dtype: torch.dtype) -> None:
        """Keep the weights in dtype (bfloat16, float16) for decoding. Under autocast float32 weights are
        cast again at every token, and decoding one token is mostly reading every weight: in float32 plus
        the cast that is about four times the bytes. Buffers (rotary tables) stay as they are. Training
        needs the float32 weights; a model cast here is for sampling only. float32 leaves them as they are."""
        for p in self.parameters():  # each once, so the tied wte/lm_head weight stays shared
            p.data = p.data.to(dtype)

    def compile_decode(self, cuda_graph: str = "own") -> None:
        """torch.compile decode_next, which generate then calls for every token after a prefill: one graph
        (fullgraph) compiled once per temperature and top_k (dynamic=False: its shapes never change).

        On CUDA the compiled step then runs as a CUDA graph, one launch per token instead of one per kernel,
        which is most of the time a small model takes per token. cuda_graph="own" (the default): generate
        records it itself (DecodeGraph), so a token costs the host a replay, the noise and a copy of the token:
        no guards of torch.compile, no wrappers around the compiled code. cuda_graph="reduce-overhead":
        torch.compile's mode of that name records it and its wrappers run per token (kept to compare)."""
        if cuda_graph not in ("own", "reduce-overhead"):
            raise ValueError(f"cuda_graph must be 'own' or 'reduce-overhead', got {cuda_graph!r}")
        cuda = self.lm_head.weight.is_cuda
        mode = "reduce-overhead" if cuda and cuda_graph == "reduce-overhead" else "default"
        self.decode_next = torch.compile(self.decode_next, mode=mode, fullgraph=True, dynamic=False)
        self.decode_graphs = cuda_graph if cuda else None
        self._kept_cache = self._kept_graph = None

    def decode_graph(self, cache: KVCache, temperature: float, top_k: int | None) -> DecodeGraph:
        """The recorded decode step for this cache (kept by kv_cache, which keys it by batch size, dtype and
        inference mode) and way of choosing, kept for the next call like the cache; recorded again when
        either changes, or autocast does."""
        dev = cache.k.device.type
        key = (cache, temperature, top_k, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        kept = self._kept_graph
        if kept is None or kept[0] != key:
            self._kept_graph = None  # the old graph's memory goes before the new one is recorded
            step = DecodeGraph(self.decode_next, cache, self.config.vocab_size, temperature, top_k)
            self._kept_graph = kept = (key, step)
        return kept[1]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        on_token: Callable[[], None] | None = None,
        window: str = "restart",
    ) -> torch.Tensor:
        """Continue idx (B, T) by max_new_tokens sampled tokens; temperature 0 is greedy.

        The context is at most block_size tokens. window="restart" (the default) runs with the KV
        cache, each new token costing one position: when the window is full it restarts from the
        newest block_size // 2 tokens (one forward pass over them), because learned position
        embeddings (or, with rope, rotations by absolute position) are baked into the cached keys
        and positions past block_size were never trained; so every token sees between
        block_size // 2 and block_size tokens of context. use_cache=False recomputes the same
        windows from scratch (the reference the cache is tested against).
        window="slide" is nanoGPT's: every token sees the newest block_size tokens, recomputed from
        scratch each time (no cache: slower once the window is full, and the same tokens as
        nanoGPT's generate). on_token, if given, is called after each new token (progress bars).
        """
        if window not in ("restart", "slide"):
            raise ValueError(f"window must be 'restart' or 'slide', got {window!r}")
        B, T0 = idx.size()
        block = self.config.block_size
        keep = max(1, block // 2)
        # New tokens are written into one buffer as they come, not appended with torch.cat (a new,
        # longer tensor per token): out[:, :t] are the tokens so far.
        out = idx.new_empty(B, T0 + max_new_tokens)  # (B, T0 + max_new_tokens)
        out[:, :T0] = idx
        start = max(0, T0 - block)  # the window is out[:, start:t]
        cache = self.kv_cache(B) if use_cache and window == "restart" else None
        # Recorded before the prefill (recording runs the step once, writing the cache's position 0).
        own = cache is not None and self.decode_graphs == "own"
        graph = self.decode_graph(cache, temperature, top_k) if own else None
        pos = None  # the position in the window of the decode step's token, a (1,) device tensor; None: prefill
        idx_next = idx[:, -1:]  # the newest token (B, 1), the decode step's input
        for t in range(T0, T0 + max_new_tokens):
            if window == "slide":
                start = max(0, t - block)
            elif t - start > block:  # the window is full: restart it from its newest keep tokens
                start, pos = t - keep, None
            if graph is not None and pos is not None:  # the decode step replayed; it advances pos itself
                idx_next, pos = graph.replay(idx_next, pos, generator)
            elif cache is not None and pos is not None:  # the decode step, sampling included
                noise = sampling_noise(B, self.config.vocab_size, temperature, generator, idx.device)
                idx_next = self.decode_next(idx_next, pos, cache, temperature, top_k, noise)  # (B, 1)
                if self.decode_graphs == "reduce-overhead":  # the graph's output, overwritten as it runs next
                    idx_next = idx_next.clone()  # (torch.compile refuses to read it then: seen on an H100)
                pos += 1  # on the device, never read by the host
            else:  # a forward pass over the whole window: recomputed, or the prefill of a cache
                if cache is None:
                    logits = self(out[:, start:t])[0][:, -1, :].float()  # (B, vocab)
                else:
                    logits = self.prefill(out[:, start:t], cache)
                    # Filled on the device, not copied from the host: the first decode step's position.
                    pos = torch.full((1,), t - start, dtype=torch.long, device=idx.device)
                idx_next = sample_next(logits, temperature, top_k, generator)  # (B, 1)
            out[:, t : t + 1] = idx_next
            if on_token is not None:
                on_token()
        return out


class DecodeGraph:
    """One decode step, GPT.decode_next and the choice of the next token, recorded as a CUDA graph over inputs
    and outputs of its own: the newest token, its position and the sampling noise, at fixed addresses.
    The recorded step also writes its token back as the next input and advances the position, so from one
    token to the next the host only draws the noise (from the caller's generator, as sample_next does)
    and replays the graph (and generate copies the token out). On a CPU nothing is recorded and replay
    runs the same step over the same buffers (how the tests check it against eager decoding)."""

    def __init__(
        self, step: Callable[..., torch.Tensor], cache: KVCache, vocab_size: int, temperature: float, top_k: int | None
    ) -> None:
        device, batch_size = cache.k.device, cache.k.size(1)  # the cache: (n_layer, B, n_kv, max_len, hs)
        self.idx = torch.zeros((batch_size, 1), dtype=torch.long, device=device)  # (B, 1) in, then the next token
        self.pos = torch.zeros((1,), dtype=torch.long, device=device)  # its position, then the next one
        self.noise = torch.ones((batch_size, vocab_size), device=device) if temperature else None  # (B, vocab)

        def run() -> None:
            self.idx.copy_(step(self.idx, self.pos, cache, temperature, top_k, self.noise))
            self.pos.add_(1)

        # Autocast's cache of cast weights would keep tensors made during the recording: off, whenever the
        # step runs, so the compiled step's guards (which include that setting) see one state.
        on, dtype = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
        self.autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=on, cache_enabled=False)
        self.run, self.graph = run, None
        # The first calls compile the step, tune its kernels and set up cuBLAS, none of which a recording
        # may do (torch.cuda.graph's rules), on a side stream, the one recorded on next (cuBLAS keeps its
        # workspaces per stream). They write position 0 of the cache, which the prefill that comes first
        # in every window overwrites.
        cuda = device.type == "cuda"
        side = torch.cuda.Stream() if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream())
        with self.autocast():
            with torch.cuda.stream(side) if cuda else nullcontext():
                for _ in range(3):
                    self.pos.zero_()
                    run()
            if cuda:
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, stream=side):
                    run()

    def replay(
        self, idx: torch.Tensor, pos: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The token after idx (B, 1) at position pos (1,) -> (next token (B, 1), pos + 1), both this graph's
        buffers, overwritten by the next replay. Passing them back in, as generate does, copies nothing."""
        if idx is not self.idx:
            self.idx.copy_(idx)
        if pos is not self.pos:
            self.pos.copy_(pos)
        if self.noise is not None:  # the draws sampling_noise would make, in place
            self.noise.exponential_(1, generator=generator)
        if self.graph is not None:
            self.graph.replay()
        else:
            with self.autocast():
                self.run()
        return self.idx, self.pos


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token of each row of logits (B, vocab): argmax at temperature 0, else sampled from the
    softmax of logits / temperature, among the top_k most likely when top_k is set, drawing from generator
    (None: torch's default one). Nothing here waits for the device (on CUDA a sync per token would stall
    the queue of kernels)."""
    B, V = logits.shape
    return choose_next(logits, temperature, top_k, sampling_noise(B, V, temperature, generator, logits.device))


def sampling_noise(
    batch_size: int, vocab_size: int, temperature: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor | None:
    """The random numbers one token's sampling uses: (B, vocab) float32 draws from Exp(1) (None at temperature
    0, which draws nothing)."""
    if temperature == 0:
        return None
    return torch.empty(batch_size, vocab_size, dtype=torch.float32, device=device).exponential_(1, generator=generator)


def choose_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, noise: torch.Tensor | None
) -> torch.Tensor:
    """sample_next's choice given its noise (sampling_noise): plain arithmetic on tensors, so it can join a
    compiled graph (GPT.decode_next)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k), largest first
        # masked_fill, not logits[logits < ...] = -inf: assigning through a boolean index looks up the
        # True positions (nonzero), which waits for the device.
        logits = logits.masked_fill(logits < v[:, -1:], -float("inf"))
    probs = F.softmax(logits, dim=-1)  # (B, vocab)
    # One draw from each row of probs by the exponential race: with q ~ Exp(1), token i comes first
    # (argmax of probs / q) with probability probs[i]. torch.multinomial(probs, 1) computes exactly
    # this for one sample, but also checks probs on the host first (a sync on CUDA). Its q are drawn
    # from the generator in the same way (sampling_noise), so the tokens are bit-identical to
    # torch.multinomial(probs, 1, generator=generator) for the same generator state (checked on CPU:
    # float32 probs, many rows, seeds).
    return (probs / noise).argmax(dim=-1, keepdim=True)  # (B, 1)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not -1 (0 when every target is masked)."""
    flat = targets.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat, ignore_index=-1, reduction="sum")
    return total / (flat != -1).sum().clamp(min=1)


# GPT.forward(..., return_logits=False) computes the head and the loss chunk by chunk (ChunkedHeadLoss) when the
# full float32 logits, rows * vocab * 4 bytes, would take more than this; it is also one chunk's share of them.
# GPT-2 124M with batch 12 of 1024 would hold 2.4 GB; a 65-character model stays on the plain path. Tests lower it.
CHUNKED_LOSS_BYTES = 256 * 2**20


def loss_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk of ChunkedHeadLoss: a multiple of 128 (matmul-friendly), at least 128, whose float32
    logits take about CHUNKED_LOSS_BYTES (1280 rows for GPT-2's 50304 tokens)."""
    return max(128, CHUNKED_LOSS_BYTES // (4 * vocab_size) // 128 * 128)


def chunked_head_loss(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 0.0, chunk_rows: int | None = None
) -> torch.Tensor:
    """masked_cross_entropy(softcapped(x @ weight.T), targets) without ever holding more than chunk_rows rows
    of logits: x (N, C) hidden states, weight (V, C) the head, targets (N,) with -1 ignored -> scalar loss."""
    rows = chunk_rows or loss_chunk_rows(weight.size(0))
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return ChunkedHeadLoss.apply(x, weight, targets, float(softcap), rows)
    return _head_loss_chunks(x, weight, targets, float(softcap), rows, False, False)[0]  # evaluation: the loss only


class ChunkedHeadLoss(torch.autograd.Function):
    """The head and the cross-entropy fused, chunk by chunk of rows ("cut cross-entropy"): the forward also
    computes the gradients of x and the weight, so only those, (N, C) and (V, C), are kept for backward,
    never the (N, V) logits. Call it through chunked_head_loss, which skips it when no gradient is wanted
    (under torch.no_grad ctx.needs_input_grad still says True, so the gradients would be computed for nothing)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float, chunk_rows: int
    ) -> torch.Tensor:
        loss, grad_x, grad_w = _head_loss_chunks(x, weight, targets, softcap, chunk_rows, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x, grad_w = ctx.saved_tensors  # d loss / d x, d loss / d weight, computed in forward
        # The chain rule: scale them by d out / d loss, a scalar tensor (not read on the host).
        gx = grad_x * grad_out if ctx.needs_input_grad[0] else None
        gw = grad_w * grad_out if ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None


def _head_loss_chunks(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float,
    chunk_rows: int,
    want_grad_x: bool,
    want_grad_w: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(mean loss, d loss / d x (N, C) or None, d loss / d weight (V, C) or None) over chunks of rows."""
    N = x.size(0)
    # The matmuls run in the dtype the plain head would: autocast's (bfloat16 under torch.autocast) or the inputs'.
    # Autocast is then switched off here and every cast made explicitly, so it cannot cast behind our back.
    dev = x.device.type
    autocast = torch.is_autocast_enabled(dev)
    dtype = torch.get_autocast_dtype(dev) if autocast else torch.promote_types(x.dtype, weight.dtype)
    with torch.autocast(dev, enabled=False):
        w = weight.to(dtype)  # (V, C), a copy only under autocast, as the plain nn.Linear makes too
        n = (targets != -1).sum().clamp(min=1)  # targets counted, a tensor: no host sync (FSDP/DDP, compile)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if want_grad_x else None  # (N, C)
        acc = torch.promote_types(dtype, torch.float32)  # float32 sums of bfloat16 / float16 products
        grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if want_grad_w else None  # (V, C)
        for start in range(0, N, chunk_rows):
            xc = x[start : start + chunk_rows].to(dtype)  # (R, C)
            tc = targets[start : start + chunk_rows]  # (R,)
            valid = tc != -1  # (R,)
            tgt = tc.clamp(min=0).unsqueeze(1)  # (R, 1); ignored rows point at token 0 and are masked below
            logits = (xc @ w.t()).float()  # (R, V) float32 statistics, as masked_cross_entropy's .float()
            if softcap:  # cap * tanh(logits / cap), in float32 (tanh saturates early in bfloat16)
                logits = torch.tanh(logits / softcap).mul_(softcap)
            lse = torch.logsumexp(logits, dim=1)  # (R,)
            total = total + torch.where(valid, lse - logits.gather(1, tgt).squeeze(1), 0.0).sum()
            if not (want_grad_x or want_grad_w):
                continue
            # Through the soft-cap: d (cap * tanh(z / cap)) / dz = 1 - tanh^2 = 1 - (logits / cap)^2.
            slope = 1 - (logits / softcap).square_() if softcap else None  # (R, V)
            # d loss / d logits = (softmax - one-hot) / n on counted rows, 0 on ignored ones, made in place
            # in the logits' buffer: one (R, V) float32 buffer per chunk, two with the soft-cap. The one-hot
            # is a comparison with the column index, not a scatter: compiled, all of this is then one
            # element-wise kernel from the logits to the gradient in the compute dtype, where a scatter
            # would have a float32 (R, V) buffer written, patched and read again (the same bits either way).
            grad = logits.sub_(lse.unsqueeze(1)).exp_()  # (R, V) softmax
            grad.sub_((torch.arange(grad.size(1), device=grad.device) == tgt).to(grad.dtype))
            grad.mul_((valid / n).unsqueeze(1))
            if slope is not None:
                grad.mul_(slope)
            grad = grad.to(dtype)  # (R, V), the matmuls in the compute dtype like the plain backward
            if want_grad_x:
                grad_x[start : start + chunk_rows] = grad @ w  # (R, C)
            if want_grad_w and grad_w.dtype == dtype:
                grad_w.addmm_(grad.t(), xc)  # (V, C), no temporary
            elif want_grad_w:
                grad_w += grad.t() @ xc  # (V, C): bf16 products summed over chunks in float32 (add_ upcasts)
        loss = total / n
        if want_grad_w:
            grad_w = grad_w.to(weight.dtype)
    return loss, grad_x, grad_w
