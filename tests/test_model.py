"""Tests for model.py: shapes, init, causality, the KV cache, the loss mask, the chunked head loss and the
optimizer groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gptsmith import model as model_module
from gptsmith.model import GPT, GPTConfig, chunked_head_loss, masked_cross_entropy


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg)).eval()


def test_shapes_with_and_without_targets():
    model = tiny()
    idx = torch.randint(0, 50, (3, 10))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 50) and loss.shape == ()
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 50) and loss is None  # only the last position without targets


def test_last_position_logits_match_the_full_forward():
    model = tiny()
    idx = torch.randint(0, 50, (2, 12))
    full, _ = model(idx, torch.zeros_like(idx))
    last, _ = model(idx)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_loss_at_init_is_close_to_uniform():
    model = tiny(vocab_size=65, n_layer=4)
    idx = torch.randint(0, 65, (8, 16))
    _, loss = model(idx, torch.randint(0, 65, (8, 16)))
    assert abs(loss.item() - math.log(65)) < 0.1


def test_init_follows_gpt2():
    model = tiny(n_layer=8, n_embd=128, n_head=4)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    proj = model.transformer.h[0].mlp.c_proj.weight
    fc = model.transformer.h[0].mlp.c_fc.weight
    assert abs(proj.std().item() - 0.02 / math.sqrt(16)) < 0.001
    assert abs(fc.std().item() - 0.02) < 0.001
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum() == 0


def test_one_fused_qkv_projection_and_no_per_head_modules():
    model = tiny()
    attn = model.transformer.h[0].attn
    assert attn.c_attn.weight.shape == (3 * 32, 32)
    assert not any(isinstance(m, torch.nn.ModuleList) for m in attn.modules())


def test_causality_later_tokens_do_not_change_earlier_logits():
    model = tiny()
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 50
    a, _ = model(idx, idx)
    b, _ = model(changed, changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_targets_of_minus_one_are_ignored():
    model = tiny()
    idx = torch.randint(0, 50, (2, 8))
    targets = torch.randint(0, 50, (2, 8))
    masked = targets.clone()
    masked[:, 5:] = -1
    logits, loss = model(idx, masked)
    expected = F.cross_entropy(logits[:, :5].reshape(-1, 50), targets[:, :5].reshape(-1))
    torch.testing.assert_close(loss, expected)
    assert model(idx, targets)[1].item() != loss.item()


def test_masked_cross_entropy_of_an_all_masked_batch_is_zero():
    loss = masked_cross_entropy(torch.randn(1, 4, 10), torch.full((1, 4), -1))
    assert loss.item() == 0.0


def test_cached_forward_equals_full_forward():
    model = tiny()
    idx = torch.randint(0, 50, (2, 12))
    full, _ = model(idx, torch.zeros_like(idx))
    cache = model.kv_cache(2)
    first, _ = model(idx[:, :5], torch.zeros(2, 5, dtype=torch.long), cache=cache)  # a prompt (prefill)
    pos = torch.arange(5, 9)  # a chunk after the cache, at these positions
    chunk, _ = model(idx[:, 5:9], torch.zeros(2, 4, dtype=torch.long), cache=cache, pos=pos)
    outs = [first, chunk]
    for t in range(9, 12):  # then the decode step, one position at a time
        outs.append(model.decode_one_token(idx[:, t : t + 1], torch.tensor([t]), cache)[:, None])
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "prompt_len,new,top_k,temperature",
    [(1, 40, None, 1.0), (5, 30, 5, 0.8), (20, 25, None, 1.0), (3, 20, None, 0.0)],
    ids=["from-one-token", "top-k", "prompt-longer-than-block", "greedy"],
)
def test_kv_cache_generate_equals_naive_generate(prompt_len, new, top_k, temperature):
    """Same seed, same tokens, including past block_size where the window restarts."""
    model = tiny()
    idx = torch.randint(0, 50, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    out = {}
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(42)
        out[use_cache] = model.generate(
            idx, new, temperature=temperature, top_k=top_k, generator=g, use_cache=use_cache
        )
    assert out[True].shape == (2, prompt_len + new)
    assert torch.equal(out[True], out[False])
    assert torch.equal(out[True][:, :prompt_len], idx)


def test_top_k_one_is_greedy():
    model = tiny()
    idx = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(idx, 10, top_k=1, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 10, temperature=0.0)
    assert torch.equal(a, b)


# --- the static KV cache: allocated once, written by position, decoding without host syncs -------------------

ARCHS = {  # position schemes and key/value head counts the cache must serve alike
    "learned": {},
    "rope": dict(pos_emb="rope"),
    "gqa": dict(n_head=4, n_kv_head=2),
    "rope-mqa": dict(pos_emb="rope", n_head=4, n_kv_head=1),
}
SAMPLING = {"greedy": dict(temperature=0.0), "top-k": dict(temperature=0.8, top_k=5)}


def test_kv_cache_is_allocated_once_at_full_size():
    model = tiny(n_head=4, n_kv_head=2)
    cache = model.kv_cache(3)
    shape = (2, 3, 2, 16, 8)  # (n_layer, B, n_kv_head, block_size, hs)
    assert cache.k.shape == cache.v.shape == shape and cache.k.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.kv_cache(1).k.dtype == torch.bfloat16  # what autocast computes the keys in
    k_ptr, v_ptr = cache.k.data_ptr(), cache.v.data_ptr()
    model.prefill(torch.zeros(3, 5, dtype=torch.long), cache)
    for t in range(5, 16):
        model.decode_one_token(torch.zeros(3, 1, dtype=torch.long), torch.tensor([t]), cache)
    assert (cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape) == (k_ptr, v_ptr, shape)
    assert cache.k[:, :, :, 15].abs().sum() > 0  # written in place, up to the last position


@pytest.mark.parametrize("sampling", SAMPLING.values(), ids=SAMPLING.keys())
@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
def test_static_cache_generate_equals_recompute(arch, sampling):
    """Token for token as recomputing every window, a batch of 3, through four window restarts (block 16)."""
    model = tiny(**arch)
    idx = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(1))
    out = [
        model.generate(idx, 45, generator=torch.Generator().manual_seed(42), use_cache=use_cache, **sampling)
        for use_cache in (True, False)
    ]
    assert out[0].shape == (3, 49) and torch.equal(out[0], out[1])
    assert not torch.equal(out[0][0], out[0][1])  # the rows are decoded apart


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
def test_cached_logits_equal_the_windows_full_forward(monkeypatch, arch):
    """The logits behind every token, before and after window restarts (where keys from before the
    restart stay in the cache and must stay masked), match recomputing the window."""
    model = tiny(**arch)
    idx = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(2))
    real = model_module.choose_next  # every token's choice: after a full forward, a prefill or a decode step
    seen = {}
    for use_cache in (True, False):
        logits = seen[use_cache] = []

        def spy(lg, *args, logits=logits):
            logits.append(lg.clone())
            return real(lg, *args)

        monkeypatch.setattr(model_module, "choose_next", spy)
        model.generate(idx, 40, temperature=0, use_cache=use_cache)
    assert len(seen[True]) == len(seen[False]) == 40
    for step, (cached, full) in enumerate(zip(seen[True], seen[False])):
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4, msg=lambda m, step=step: f"step {step}: {m}")


class HostReads(TorchDispatchMode):
    """Records the aten ops that read a tensor's values on the host, which on a GPU wait for it:
    .item() and bool() (_local_scalar_dense), nonzero, multinomial (it checks probs on the host),
    and indexing by a boolean mask (nonzero inside)."""

    SYNCING = ("_local_scalar_dense", "nonzero", "multinomial", "masked_select", "is_nonzero", "equal", "_unique2")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.removeprefix("aten::")
        indices = args[1] if name.startswith("index") and len(args) > 1 and isinstance(args[1], list | tuple) else ()
        if name in self.SYNCING or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


HOST_READS = ("item", "tolist", "__bool__", "cpu", "__int__", "__float__", "__index__", "numpy")


def count_host_reads(monkeypatch) -> list[str]:
    """Patch the tensor methods that hand a value to the host; their calls are appended to the list returned."""
    calls: list[str] = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, real=real, name=name, **kwargs):
            calls.append(name)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_decode_makes_no_host_syncs(monkeypatch):
    """Decode steps after the prefill, sampling with top_k and a generator, through a window restart (its
    prefill included), with rope and grouped-query attention: not one read of a device value on the host."""
    model = tiny(pos_emb="rope", n_head=4, n_kv_head=2)
    prompt = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(3))
    cache = model.kv_cache(2)
    g = torch.Generator().manual_seed(0)
    idx_next = model_module.sample_next(model.prefill(prompt, cache), 0.8, 5, g)  # (2, 1) at position 4
    pos = torch.tensor([4])
    calls = count_host_reads(monkeypatch)
    with HostReads() as ops:
        for _ in range(12):  # positions 4 .. 15: up to the end of the window
            logits = model.decode_one_token(idx_next, pos, cache)
            idx_next = model_module.sample_next(logits, 0.8, 5, g)
            pos += 1
        decode_calls = []

        def decode(*args):
            decode_calls.append(args)
            return GPT.decode_one_token(model, *args)

        monkeypatch.setattr(model, "decode_one_token", decode)
        model.generate(prompt, 30, temperature=0.8, top_k=5, generator=g)  # the loop itself, restarts and all
        assert len(decode_calls) > 20
        decode_calls.clear()
        model.decode_graphs = "own"  # and with the step DecodeGraph records on CUDA (run here)
        model.generate(prompt, 30, temperature=0.8, top_k=5, generator=g)
        assert len(decode_calls) > 20
    assert calls == [] and ops.seen == []
    with HostReads() as ops:  # and the checks see what they look for
        torch.ones(2).sum().item()
        torch.multinomial(torch.ones(1, 3), 1)
    assert calls == ["item"] and ops.seen == ["_local_scalar_dense", "multinomial"]


def test_exponential_race_draws_what_multinomial_draws():
    """sample_next draws torch.multinomial's tokens (the same arithmetic inside), bit for bit from the same
    generator; top_k by masked_fill masks what boolean-index assignment did."""
    for seed in range(3):
        logits = 3 * torch.randn(64, 50, generator=torch.Generator().manual_seed(seed))
        for top_k in (None, 5):
            scaled = logits / 0.7
            if top_k:
                scaled[scaled < torch.topk(scaled, top_k).values[:, [-1]]] = -float("inf")  # the old way
            probs = F.softmax(scaled, dim=-1)
            g_ours, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            for _ in range(3):  # successive draws keep the generators in step
                ours = model_module.sample_next(logits, 0.7, top_k, g_ours)
                assert torch.equal(ours, torch.multinomial(probs, 1, generator=g_ref))


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
def test_recorded_decode_step_gives_the_eager_tokens(monkeypatch, arch):
    """generate with the decode step DecodeGraph records on CUDA (compile_decode's default there); on a CPU
    the same step over the same buffers, run instead of replayed. Its first calls write position 0 of the
    cache before any prefill; it takes the token and position after each prefill (window restarts
    included), then feeds itself; it gives eager decoding's tokens, greedy and sampled, and is kept for
    the next call with the same way of choosing."""
    idx = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(1))
    runs = [dict(temperature=0.0), dict(temperature=0.8, top_k=5), dict(temperature=0.8, top_k=5)]
    expected = [tiny(**arch).generate(idx, 40, generator=torch.Generator().manual_seed(7), **run) for run in runs]
    model = tiny(**arch)
    model.decode_graphs = "own"
    steps, prefills = [], []
    decode_next, prefill = model.decode_next, model.prefill
    monkeypatch.setattr(model, "decode_next", lambda *args: steps.append(args) or decode_next(*args))
    monkeypatch.setattr(model, "prefill", lambda *args: prefills.append(args) or prefill(*args))
    graphs = []
    for run, tokens in zip(runs, expected):
        steps.clear()
        prefills.clear()
        assert torch.equal(model.generate(idx, 40, generator=torch.Generator().manual_seed(7), **run), tokens)
        graphs.append(model._kept_graph[1])
        first_calls = 0 if len(graphs) > 1 and graphs[-1] is graphs[-2] else 3
        assert len(prefills) == 4  # the prompt, then 3 window restarts (block 16, keeping 8)
        assert len(steps) == first_calls + 40 - len(prefills)
        assert all(a[0] is graphs[-1].idx and a[1] is graphs[-1].pos for a in steps)  # always its own buffers
    assert graphs[0] is not graphs[1] and graphs[1] is graphs[2]  # recorded again only for a new way of choosing


@pytest.mark.slow  # torch.compile: about 10 s per model on a 2-core CPU
@pytest.mark.parametrize(
    "arch, own_graph",
    [(ARCHS["learned"], False), (ARCHS["rope-mqa"], False), (ARCHS["rope-mqa"], True)],
    ids=["learned", "rope-mqa", "rope-mqa-own-graph"],
)
def test_compiled_decode_step_gives_the_eager_tokens(arch, own_graph):
    """decode_next, the decode step with the sampling's arithmetic, compiles as one graph (fullgraph,
    dynamic=False) per way of choosing (greedy; temperature and top_k), once for every position and
    window restart (a recompile would raise), and gives eager decoding's tokens; also run by DecodeGraph
    as on CUDA (compiled by its first calls, then run over its buffers: no recompile either)."""
    idx = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(1))

    def runs():  # greedy, and sampled with top_k from a fresh generator
        return [dict(temperature=0.0), dict(temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(7))]

    expected = [tiny(**arch).generate(idx, 40, **run) for run in runs()]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny(**arch)
    model.compile_decode()
    model.decode_graphs = "own" if own_graph else None
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for _ in range(2):  # the second round reuses both graphs
            for run, tokens in zip(runs(), expected):
                assert torch.equal(model.generate(idx, 40, **run), tokens)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # it did run compiled


def test_configure_optimizers_decays_only_matrices():
    model = tiny()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters())  # the tied matrix counted once


def test_parameter_count_and_flops():
    model = tiny()
    total = sum(p.numel() for p in model.parameters())
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == total - 16 * 32
    flops = model.flops_per_token()
    assert flops == 6 * model.get_num_params() + 12 * 2 * 2 * 16 * 16
    assert model.estimate_mfu(1000.0, flops * 2000.0) == pytest.approx(0.5)


def test_crop_block_size():
    model = tiny()
    model.crop_block_size(8)
    assert model.config.block_size == 8 and model.transformer.wpe.weight.shape == (8, 32)
    logits, _ = model(torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 1, 50)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_dropout_only_in_training_mode():
    model = tiny(dropout=0.5)
    idx = torch.randint(0, 50, (2, 8))
    a, _ = model(idx, idx)
    b, _ = model(idx, idx)
    torch.testing.assert_close(a, b)
    model.train()
    c, _ = model(idx, idx)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_drops_with_chance_p_scales_the_rest_and_passes_gradients_through_the_mask(dtype):
    torch.manual_seed(0)
    x = torch.randn(200, 500, dtype=dtype).abs().add_(0.5).requires_grad_()
    y = model_module.dropout(x, 0.2)
    assert y.dtype == dtype
    dropped = y == 0
    assert abs(dropped.float().mean().item() - 0.2) < 0.005  # 100,000 draws: 4 standard deviations
    for lane in range(4):  # each 64-bit draw makes four 16-bit numbers: each drops with chance p
        assert abs(dropped.flatten()[lane::4].float().mean().item() - 0.2) < 0.01  # 25,000: 4 sd
    odd = model_module.dropout(torch.ones(3, 7, 5, dtype=dtype), 0.5)  # 105 elements: not whole draws
    assert odd.shape == (3, 7, 5) and set(odd.unique().tolist()) == {0.0, 2.0}
    torch.testing.assert_close(y[~dropped], (x[~dropped] / 0.8).to(dtype))
    y.sum().backward()
    torch.testing.assert_close(x.grad, (~dropped).to(dtype) / 0.8)
    assert model_module.dropout(x, 0.2, training=False) is x and model_module.dropout(x, 0.0) is x
    assert not model_module.dropout(x, 1.0).any()
    module = model_module.Dropout(0.2)
    torch.manual_seed(1)
    a = module(x)
    torch.manual_seed(1)
    torch.testing.assert_close(a, model_module.dropout(x, 0.2))  # the module is the function
    assert module.eval()(x) is x


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_written_out_attention_is_sdpas_causal_attention_and_drops_weights_like_dropout(n_kv_head):
    """CPU training with dropout writes attention out (model.causal_attention_with_dropout): without
    dropout it is SDPA's causal attention (grouped-query too); with it, the weights after softmax
    go through the same dropout as everything else."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 10, 8)
    k, v = torch.randn(2, n_kv_head, 10, 8), torch.randn(2, n_kv_head, 10, 8)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv_head != 4)
    torch.testing.assert_close(model_module.causal_attention_with_dropout(q, k, v, 0.0), expected)
    torch.manual_seed(5)
    y = model_module.causal_attention_with_dropout(q, k, v, 0.3)
    group = 4 // n_kv_head
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    att = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(torch.ones(10, 10).triu(1).bool(), float("-inf"))
    torch.manual_seed(5)
    torch.testing.assert_close(y, model_module.dropout(att.softmax(-1), 0.3) @ v)


@pytest.mark.slow  # torch.compile: about 15 s on a 2-core CPU
def test_compiled_training_on_a_cpu_draws_the_eager_dropout_masks():
    """The CPU's dropout masks come from an operator torch.compile calls rather than traces
    (model.dropout_mask): a compiled step draws the masks an eager one draws, from the same
    generator, so its loss and gradients are the eager ones (inductor's own random numbers would
    differ)."""
    model = tiny(dropout=0.2).train()
    idx = torch.randint(0, 50, (4, 8))
    torch.manual_seed(7)
    eager_loss, eager_grads = loss_and_grads(model, idx, idx, False)
    torch.manual_seed(7)
    loss, grads = loss_and_grads(torch.compile(model, fullgraph=True, dynamic=False), idx, idx, False)
    torch.testing.assert_close(loss, eager_loss)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_training_with_dropout_on_a_cpu_takes_the_written_out_attention(monkeypatch):
    model = tiny(dropout=0.1)
    calls = []
    real = model_module.causal_attention_with_dropout
    monkeypatch.setattr(model_module, "causal_attention_with_dropout", lambda *a: calls.append(1) or real(*a))
    idx = torch.randint(0, 50, (2, 8))
    model(idx, idx)
    assert not calls  # evaluation: no dropout, SDPA
    model.train()(idx, idx)
    assert len(calls) == 2  # one per layer


# The chunked head + loss (model.ChunkedHeadLoss). CHUNKED_LOSS_BYTES = 0 sends every forward(...,
# return_logits=False) with targets down the chunked path, in chunks of 128 rows (the least): the 20 x 16 = 320
# rows below make two full chunks and a partial one of 64.
MASKS = {"some-ignored": lambda t: t.masked_fill(torch.arange(16) >= 11, -1), "all-ignored": lambda t: t.fill_(-1)}
# The tiny model's logits are about 0.1 (at most ~0.6): a cap of 0.15 bends them well into tanh's curve.
HEADS = {"tied": {}, "untied": dict(tie_weights=False), "softcap": dict(logit_softcap=0.15)}
HEADS["untied-softcap"] = dict(tie_weights=False, logit_softcap=0.15)


def chunk_everything(monkeypatch) -> None:
    monkeypatch.setattr(model_module, "CHUNKED_LOSS_BYTES", 0)
    assert model_module.loss_chunk_rows(50) == 128

    def refuse(*args, **kwargs):
        raise AssertionError("the plain loss ran where the chunked one should")

    monkeypatch.setattr(model_module, "masked_cross_entropy", refuse)


def loss_and_grads(model: GPT, idx, targets, bf16: bool, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, loss = model(idx, targets, **kwargs)
    assert (logits is None) == (kwargs.get("return_logits") is False)
    loss.backward()
    # (torch.compile's wrapper names them _orig_mod.<name>)
    return loss.detach(), {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("head", HEADS.values(), ids=HEADS.keys())
def test_chunked_head_loss_matches_the_plain_loss_and_gradients(monkeypatch, head, mask, bf16):
    model = tiny(**head).train()  # dropout 0: both passes see the same network
    idx = torch.randint(0, 50, (20, 16))
    targets = mask(torch.randint(0, 50, (20, 16)))
    targets[3] = -1  # a whole sequence ignored too
    plain_loss, plain = loss_and_grads(model, idx, targets, bf16)
    chunk_everything(monkeypatch)
    loss, grads = loss_and_grads(model, idx, targets, bf16, return_logits=False)
    # The same float32 statistics of the same logits (bf16 ones alike under autocast), summed in another order:
    # float32 rounding only.
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(plain)  # the head among them (as transformer.wte.weight when tied)
    for name, grad in grads.items():
        # float32: the same products summed in another order (chunks), so a few float32 ulps of the largest entry.
        # bf16: the plain head's weight gradient is one bf16 matmul over all rows, rounded once to bf16 (8 bits),
        # ours sums 128-row bf16 matmuls in float32, so they differ by about bf16's epsilon 2^-8 of the largest
        # entry, which then flows on through the bf16 network below.
        scale = plain[name].abs().max().item()
        tol = dict(rtol=2e-2, atol=8e-3 * scale) if bf16 else dict(rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(grad, plain[name], **tol, msg=lambda m, name=name: f"{name}: {m}")
        assert torch.isfinite(grad).all()
    if (targets == -1).all():
        assert loss.item() == 0.0 and all(g.count_nonzero() == 0 for g in grads.values())


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("head", HEADS.values(), ids=HEADS.keys())
def test_chunked_evaluation_computes_only_the_loss(monkeypatch, head, bf16):
    model = tiny(**head)
    idx, targets = torch.randint(0, 50, (20, 16)), torch.randint(0, 50, (20, 16))
    targets[:, :5] = -1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        _, plain = model(idx, targets)
        chunk_everything(monkeypatch)
        monkeypatch.setattr(model_module.ChunkedHeadLoss, "apply", None)  # no gradients computed or kept
        logits, loss = model(idx, targets, return_logits=False)
    assert logits is None and loss.grad_fn is None
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
def test_chunked_head_loss_on_its_own_frozen_head_and_odd_chunks(bf16):
    """The function alone against masked_cross_entropy: chunks of 7 rows (the last of 6), a head without
    gradient, logits of about 4 (so bfloat16's rounding of them, 2^-8 relative, shows in the loss)."""
    torch.manual_seed(0)
    x, w = torch.randn(97, 16, requires_grad=True), torch.randn(30, 16)
    targets = torch.randint(0, 30, (97,))
    targets[::5] = -1
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = chunked_head_loss(x, w, targets, softcap=2.0, chunk_rows=7)
        expected = masked_cross_entropy(2.0 * torch.tanh(F.linear(x, w).float() / 2.0), targets)
    (grad,) = torch.autograd.grad(3 * loss, x)  # backward scales the gradient kept from forward by grad_output
    (expected_grad,) = torch.autograd.grad(3 * expected, x)
    # The same logits (bf16 ones under autocast) and float32 statistics: float32 rounding only. Each row's
    # gradient is the same matmul of the same bf16 operands; allow bf16's epsilon for a different kernel.
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, **(dict(rtol=8e-3, atol=1e-4) if bf16 else {}))


def test_return_logits_defaults_keep_the_plain_head(monkeypatch):
    model = tiny()
    idx, targets = torch.randint(0, 50, (20, 16)), torch.randint(0, 50, (20, 16))
    logits, loss = model(idx, targets)  # small logits: the plain path even with return_logits=False, bit for bit
    assert model(idx, targets, return_logits=False) == (None, loss)
    monkeypatch.setattr(model_module, "CHUNKED_LOSS_BYTES", 0)
    chunked_logits, chunked_loss = model(idx, targets)  # model(x, y) always returns the full logits
    assert chunked_logits.shape == (20, 16, 50) and torch.equal(chunked_logits, logits)
    assert torch.equal(chunked_loss, loss)


def test_chunked_forward_keeps_no_full_logits_for_backward(monkeypatch):
    """Only the gradients (N, C) and (V, C) are saved, never a (N, V) tensor (here the largest by far)."""
    model = tiny(vocab_size=512).train()
    idx, targets = torch.randint(0, 512, (20, 16)), torch.randint(0, 512, (20, 16))
    full = 20 * 16 * 512

    def largest_saved(**kwargs) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            _, loss = model(idx, targets, **kwargs)
        loss.backward()
        return max(sizes)

    assert largest_saved() >= full  # the plain path keeps the logits: the check can see them
    chunk_everything(monkeypatch)
    assert largest_saved(return_logits=False) < full


@pytest.mark.slow
def test_chunked_head_loss_under_torch_compile(monkeypatch):
    """Dynamo traces the autograd.Function whole (no graph break); compiled equals eager."""
    model = tiny(n_layer=1, logit_softcap=0.15, tie_weights=False).train()
    idx, targets = torch.randint(0, 50, (20, 16)), torch.randint(0, 50, (20, 16))
    targets[:, 11:] = -1
    chunk_everything(monkeypatch)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(idx, targets, return_logits=False)
    assert explained.graph_break_count == 0
    eager_loss, eager = loss_and_grads(model, idx, targets, False, return_logits=False)
    loss, grads = loss_and_grads(torch.compile(model), idx, targets, False, return_logits=False)
    torch.testing.assert_close(loss, eager_loss)
    for name, grad in grads.items():  # inductor fuses and reorders: float32 rounding, as above
        torch.testing.assert_close(grad, eager[name], rtol=1e-4, atol=1e-5 * eager[name].abs().max().item())


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
def test_weights_cast_for_inference_give_autocasts_logits(arch):
    """cast_for_inference (sampling in bfloat16): every weight in bfloat16, a tied head still the
    embedding, the rotary tables untouched, and the logits under autocast close to those of the
    float32 weights (autocast ran the matmuls in bfloat16 already)."""
    model = tiny(**arch)
    tied = model.lm_head.weight is model.transformer.wte.weight
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(idx)[0].float()
        model.cast_for_inference(torch.bfloat16)
        after = model(idx)[0].float()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    for name, b in model.named_buffers():
        assert b.dtype == buffers[name].dtype and torch.equal(b, buffers[name]), name
    torch.testing.assert_close(after, before, atol=0.05, rtol=0.05)
