"""Tests for model.py: shapes, init, causality, the KV cache, the loss mask and the optimizer groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptsmith.model import GPT, GPTConfig, KVCache, masked_cross_entropy


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
    cache = KVCache(model.config.n_layer, model.config.block_size)
    first, _ = model(idx[:, :5], torch.zeros(2, 5, dtype=torch.long), cache=cache)  # a prompt chunk
    chunk, _ = model(idx[:, 5:9], torch.zeros(2, 4, dtype=torch.long), cache=cache)  # a chunk after the cache
    outs = [first, chunk]
    for t in range(9, 12):  # then one position at a time
        out, _ = model(idx[:, t : t + 1], cache=cache)
        outs.append(out)
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
