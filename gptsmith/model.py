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


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    """The configured normalisation over the last dimension of size dim."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-5)
    return nn.LayerNorm(dim, bias=config.bias)


def rope_tables(length: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (length, head_size // 2): position t, pair i turns by t * base^(-2i/hs)."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by its positions' angles; channel i pairs with channel i + hs/2 (GPT-NeoX layout)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (T, hs/2), broadcast over batch and heads
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of the positions already seen, so a new token costs one position."""

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.n_layer, self.max_len = n_layer, max_len
        self.k: torch.Tensor | None = None  # (n_layer, B, n_kv_head, max_len, hs), allocated on first use
        self.v: torch.Tensor | None = None
        self.length = 0  # positions filled so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, T, hs) after the cached positions; return all keys and values so far."""
        if self.k is None:
            B, nh, _, hs = k.shape
            self.k = k.new_zeros(self.n_layer, B, nh, self.max_len, hs)
            self.v = torch.zeros_like(self.k)
        start, end = self.length, self.length + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.length = 0


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
        self.resid_dropout = nn.Dropout(config.dropout)
        self.q_norm = nn.RMSNorm(self.head_size, eps=1e-5) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_size, eps=1e-5) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
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
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)  # (B, n_kv, past + T, hs)
        if self.n_kv_head != self.n_head:  # each key/value head serves n_head / n_kv_head query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, nh, past + T, hs)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if past == 0:
            mask, causal = None, True  # the flash-attention path on GPUs
        elif T == 1:
            mask, causal = None, False  # one new query sees every cached position
        else:  # a chunk after cached positions: query i sees keys up to past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
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
        self.dropout = nn.Dropout(config.dropout)

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
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, rope)
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
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        )
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:  # the same matrix embeds tokens and scores them
            self.transformer.wte.weight = self.lm_head.weight
        if config.pos_emb == "rope":
            # Not persistent: computed from the config, so checkpoints hold the same keys as without rope.
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 scales the projections into the residual stream by 1/sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

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
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits, loss). Targets of -1 are left out of the loss.
        Without targets only the last position's logits are computed, (B, 1, vocab)."""
        B, T = idx.size()
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of length {past + T} exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if "wpe" in self.transformer:
            pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.transformer.wpe(pos)
        else:  # rotary: the angles of the absolute positions past .. past + T - 1
            rope = (self.rope_cos[past : past + T], self.rope_sin[past : past + T])  # (T, hs/2) each
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, rope)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.length += T
        if targets is None:
            return self._head(x[:, [-1], :]), None  # (B, 1, vocab): sampling needs no more
        logits = self._head(x)  # (B, T, vocab)
        return logits, masked_cross_entropy(logits, targets)

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
        block = self.config.block_size
        keep = max(1, block // 2)
        start = max(0, idx.size(1) - block)  # the window is idx[:, start:]
        cache = KVCache(self.config.n_layer, block) if use_cache and window == "restart" else None
        for _ in range(max_new_tokens):
            if window == "slide":
                start = max(0, idx.size(1) - block)
            elif idx.size(1) - start > block:
                start = idx.size(1) - keep
                if cache is not None:
                    cache.reset()
            if cache is not None:
                logits, _ = self(idx[:, start + cache.length :], cache=cache)
            else:
                logits, _ = self(idx[:, start:])
            idx_next = sample_next(logits[:, -1, :].float(), temperature, top_k, generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
            if on_token is not None:
                on_token()
        return idx


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token of each row of logits (B, vocab): argmax at temperature 0, else sampled
    from the softmax of logits / temperature, among the top_k most likely when top_k is set."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not -1 (0 when every target is masked)."""
    flat = targets.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat, ignore_index=-1, reduction="sum")
    return total / (flat != -1).sum().clamp(min=1)
