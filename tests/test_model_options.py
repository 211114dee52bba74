"""Tests for the modern model options (rope, RMSNorm, ReLU^2/SwiGLU, QK-norm, GQA, untied head,
soft-capping), the Muon optimizer and the WSD learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptsmith import checkpoint as ckpt_io
from gptsmith import optim, runtime
from gptsmith.config import ExportConfig, TrainConfig
from gptsmith.configurator import UserError
from gptsmith.hf import export
from gptsmith.model import GPT, GPTConfig, apply_rope, rope_tables, swiglu_hidden
from gptsmith.optim import CombinedOptimizer, Muon, configure_muon, get_lr, muon_param_split, newton_schulz
from gptsmith.trainer import train
from helpers import TINY

MODERN = dict(
    pos_emb="rope",
    norm="rmsnorm",
    activation="swiglu",
    qk_norm=True,
    n_kv_head=2,
    tie_weights=False,
    logit_softcap=15.0,
)
OPTIONS = {
    "rope": dict(pos_emb="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "relu2": dict(activation="relu2"),
    "swiglu": dict(activation="swiglu"),
    "qk_norm": dict(qk_norm=True),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "untied": dict(tie_weights=False),
    "softcap": dict(logit_softcap=5.0),
    "modern": MODERN,
    "modern-relu2": {**MODERN, "activation": "relu2", "n_kv_head": 1},
}
ALL = pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=50, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=False)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg)).eval()


@ALL
def test_shapes_and_causality(options):
    model = tiny(**options)
    idx = torch.randint(0, 50, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 50) and loss.shape == ()
    assert model(idx)[0].shape == (2, 1, 50)
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 50
    b, _ = model(changed, changed)
    torch.testing.assert_close(logits[:, :10], b[:, :10])
    assert not torch.allclose(logits[:, 10:], b[:, 10:])


@ALL
def test_cached_forward_equals_full_forward(options):
    model = tiny(**options)
    idx = torch.randint(0, 50, (2, 12))
    full, _ = model(idx, torch.zeros_like(idx))
    cache = model.kv_cache(2)
    assert cache.k.shape == (2, 2, model.config.kv_heads, 16, 8)  # (n_layer, B, n_kv_head, block_size, hs)
    outs = [model(idx[:, :5], torch.zeros(2, 5, dtype=torch.long), cache=cache)[0]]  # a prompt (prefill)
    chunk = model(idx[:, 5:9], torch.zeros(2, 4, dtype=torch.long), cache=cache, pos=torch.arange(5, 9))[0]
    outs.append(chunk)  # a chunk after it
    outs += [model.decode_one_token(idx[:, t : t + 1], torch.tensor([t]), cache)[:, None] for t in range(9, 12)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-4)


@ALL
@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.0, None), (0.8, 5)], ids=["sampled", "greedy", "top-k"])
def test_kv_cache_generate_equals_naive_generate(options, temperature, top_k):
    """Token for token, past block_size (16) where the window restarts."""
    model = tiny(**options)
    idx = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(1))
    out = [
        model.generate(
            idx,
            30,
            temperature=temperature,
            top_k=top_k,
            generator=torch.Generator().manual_seed(42),
            use_cache=use_cache,
        )
        for use_cache in (True, False)
    ]
    assert out[0].shape == (2, 33) and torch.equal(out[0], out[1])


@ALL
def test_loss_at_init_is_close_to_uniform(options):
    model = tiny(vocab_size=65, **options)
    idx = torch.randint(0, 65, (8, 16))
    _, loss = model(idx, torch.randint(0, 65, (8, 16)))
    assert abs(loss.item() - math.log(65)) < 0.15


@ALL
def test_a_few_optimizer_steps_reduce_the_loss(options):
    model = tiny(**options).train()
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(8):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_defaults_are_gpt2_and_options_change_the_right_modules():
    assert GPTConfig().is_gpt2() and GPTConfig(n_kv_head=12).is_gpt2()
    rope = tiny(pos_emb="rope")
    assert "wpe" not in rope.transformer and not any("rope" in k for k in rope.state_dict())
    assert rope.get_num_params() == rope.get_num_params(non_embedding=False)
    gqa = tiny(n_kv_head=2).transformer.h[0].attn
    assert gqa.c_attn.weight.shape == (32 + 2 * 2 * 8, 32)  # q: n_embd, k and v: n_kv_head * head size each
    untied = tiny(tie_weights=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.get_num_params() == untied.get_num_params(non_embedding=False) - 16 * 32 - 50 * 32
    assert isinstance(tiny(norm="rmsnorm").transformer.ln_f, torch.nn.RMSNorm)
    mlp = tiny(n_embd=96, n_head=4, activation="swiglu").transformer.h[0].mlp
    assert swiglu_hidden(96) == 256 and mlp.c_fc.weight.shape == (2 * 256, 96) and mlp.c_proj.weight.shape == (96, 256)
    assert swiglu_hidden(768) == 2048  # 8/3 * 768 exactly: 3 matrices of 768 x 2048 vs GPT-2's 2 of 768 x 3072
    capped = tiny(logit_softcap=2.0)
    logits, _ = capped(torch.randint(0, 50, (1, 8)), torch.zeros(1, 8, dtype=torch.long))
    assert logits.abs().max() < 2.0


def test_flops_per_token_follows_the_parameter_count():
    for options in OPTIONS.values():
        model = tiny(**options)
        assert model.flops_per_token() == 6 * model.get_num_params() + 12 * 2 * 4 * 8 * 16


def test_rotary_turns_each_channel_pair_by_its_positions_angle():
    """apply_rope is the rotation of RoFormer in GPT-NeoX's layout, channel i paired with i + hs/2 and
    turned by t * 10000^(-2i/hs) at position t: the same bits as the four-multiply textbook form in
    float32 and bfloat16, and attention scores that depend only on how far apart two positions are."""
    T, hs = 12, 8
    cos, sin = rope_tables(T, hs)  # (T, hs) each
    angles = torch.arange(T, dtype=torch.float32)[:, None] * 10000.0 ** (-torch.arange(0, hs, 2) / hs)  # (T, hs/2)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, T, hs).to(dtype)  # (B, nh, T, hs)
        x1, x2 = x.chunk(2, dim=-1)
        c, s = angles.cos().to(dtype), angles.sin().to(dtype)
        assert torch.equal(apply_rope(x, cos, sin), torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1))
    q, k = torch.randn(hs, dtype=torch.float64), torch.randn(hs, dtype=torch.float64)
    cos, sin = (table.double() for table in (cos, sin))
    rotated_q = apply_rope(q.expand(1, 1, T, hs), cos, sin)[0, 0]  # (T, hs): q at every position
    rotated_k = apply_rope(k.expand(1, 1, T, hs), cos, sin)[0, 0]
    scores = rotated_q @ rotated_k.T  # (T, T): q at position m against k at position n
    for shift in (1, 5):
        # Depends on m - n only (to the float32 precision of the tables).
        torch.testing.assert_close(scores[shift:, shift:], scores[:-shift, :-shift], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scores[0, 1], scores[0, 2])  # and does depend on it


def test_crop_block_size_with_rope():
    model = tiny(pos_emb="rope")
    model.crop_block_size(8)
    assert model.rope_cos.shape == (8, 8)
    assert model(torch.zeros(1, 8, dtype=torch.long))[0].shape == (1, 1, 50)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(n_kv_head=3), "n_kv_head"),
        (dict(n_kv_head=8), "n_kv_head"),
        (dict(pos_emb="rope", n_embd=36, n_head=4), "even head size"),
        (dict(pos_emb="alibi"), "pos_emb"),
        (dict(norm="batchnorm"), "norm"),
        (dict(activation="tanh"), "activation"),
        (dict(logit_softcap=-1.0), "logit_softcap"),
    ],
)
def test_bad_options_are_refused_clearly(options, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{"n_head": 4, "n_embd": 32, **options})
    with pytest.raises(UserError, match=match):
        TrainConfig(**{"n_head": 4, "n_embd": 32, **options})


# Training, resuming, old checkpoints, export


def final_params(out_dir: str) -> dict[str, torch.Tensor]:
    return ckpt_io.load_checkpoint(Path(out_dir) / "ckpt.pt")["model"]


def assert_exact_resume(tiny_cfg, tmp_path: Path, **kw) -> None:
    """N+M steps straight == N steps, resume, M steps: bit-identical weights."""
    kw = dict(max_iters=8, lr_decay_iters=8, eval_interval=4, **kw)
    straight = tiny_cfg(out_dir=str(tmp_path / "straight"), **kw)
    train(straight)
    split = tiny_cfg(out_dir=str(tmp_path / "split"), **{**kw, "max_iters": 4})
    train(split)
    train(dataclasses.replace(split, max_iters=8, init_from="resume"), explicit={"max_iters", "init_from"})
    a, b = final_params(straight.out_dir), final_params(split.out_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_exact_with_modern_options(tiny_cfg, tmp_path):
    assert_exact_resume(tiny_cfg, tmp_path, **MODERN)
    state = ckpt_io.load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert {k: state["model_args"][k] for k in MODERN} == MODERN


def test_resume_is_exact_with_muon(tiny_cfg, tmp_path):
    assert_exact_resume(tiny_cfg, tmp_path, optimizer="muon", muon_lr=0.02)
    state = ckpt_io.load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert len(state["optimizer"]["optimizers"]) == 2


def test_resume_is_exact_with_master_weights(tiny_cfg, tmp_path):
    """The float32 masters are the checkpoint; their bfloat16 copies are rounded from them again on resume."""
    assert_exact_resume(tiny_cfg, tmp_path, dtype="bfloat16", master_weights=True, dropout=0.1)


def test_resume_takes_options_from_the_checkpoint_and_old_checkpoints_mean_defaults(tiny_cfg):
    cfg = tiny_cfg(max_iters=2, eval_interval=2, pos_emb="rope", n_kv_head=1)
    train(cfg)
    # Defaults in the resuming config do not override the checkpoint's options...
    resumed = dataclasses.replace(cfg, pos_emb="learned", n_kv_head=None, init_from="resume", max_iters=3)
    assert train(resumed, explicit={"init_from", "max_iters"})["iter"] == 3
    # ...an explicit disagreement is refused...
    with pytest.raises(UserError, match="pos_emb"):
        train(dataclasses.replace(resumed, max_iters=4), explicit={"init_from", "pos_emb"})
    # ...and a checkpoint written before the options existed resumes as the default (GPT-2) model.
    old = tiny_cfg(max_iters=2, eval_interval=2, out_dir=str(Path(cfg.out_dir).parent / "old"))
    train(old)
    path = Path(old.out_dir) / "ckpt.pt"
    state = ckpt_io.load_checkpoint(path)
    for key in MODERN:
        del state["model_args"][key]
    ckpt_io.save_checkpoint(state, path)
    assert train(dataclasses.replace(old, init_from="resume", max_iters=3), explicit={"init_from"})["iter"] == 3


def test_export_refuses_a_non_gpt2_architecture(tmp_path):
    model = tiny(pos_emb="rope", norm="rmsnorm")
    args = dataclasses.asdict(model.config)
    ckpt_io.save_checkpoint(
        {"model": model.state_dict(), "model_args": args, "iter_num": 0, "config": {}}, tmp_path / "ckpt.pt"
    )
    with pytest.raises(UserError, match="not a GPT-2 architecture.*pos_emb='rope'"):
        export(ExportConfig(out_dir=str(tmp_path), hf_dir=str(tmp_path / "hf")))
    assert not (tmp_path / "hf").exists()


# Muon


def test_newton_schulz_gives_singular_values_near_one():
    g = torch.Generator().manual_seed(0)
    for shape in [(32, 32), (32, 96), (128, 32)]:
        # Singular values from 0.01 to 1 (condition number 100), in random directions.
        k = min(shape)
        U, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g))  # (rows, k)
        V, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g))  # (cols, k)
        G = U @ torch.diag(torch.logspace(-2, 0, k)) @ V.T
        s = torch.linalg.svdvals(newton_schulz(G, steps=5))
        assert newton_schulz(G).shape == G.shape
        assert s.min() > 0.5 and s.max() < 1.5, (shape, s.min().item(), s.max().item())


def test_newton_schulz_gives_a_matrix_the_same_bits_alone_and_in_a_stack():
    """Muon orthogonalises the matrices of one shape as a stack (and under DDP each process a share
    of it): every matrix must come out as it would alone, whatever the stack's size."""
    g = torch.Generator().manual_seed(0)
    for shape in [(24, 8), (8, 24)]:
        stack = torch.randn(3, *shape, generator=g)
        together = newton_schulz(stack)
        for i in range(3):
            assert torch.equal(together[i], newton_schulz(stack[i]))
            assert torch.equal(together[i], newton_schulz(stack[i : i + 1])[0])


def test_muon_step_decreases_the_loss_on_a_toy_problem():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.zeros(16, 8))
    X = torch.randn(64, 8)
    target = X @ torch.randn(16, 8).T  # a least-squares problem Muon can solve
    opt = Muon([W], lr=0.1)
    losses = []
    for _ in range(12):
        loss = ((X @ W.T - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0] and all(b < a for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("bf16_units", [True, False])
def test_muon_orthogonalises_in_bfloat16_where_the_cpu_has_bfloat16_units(monkeypatch, bf16_units):
    # The CPU's flags decide, so both answers are checked on any machine: bfloat16 for matrices
    # 256 or more on a side where its matmuls are native, float32 for smaller ones (little gain,
    # and their recipes keep the numerics they were measured with) and where they would be emulated.
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512f", "avx512_bf16"} if bf16_units else {"avx2", "fma"})
    cpu, big, small = torch.device("cpu"), torch.Size([272, 256]), torch.Size([384, 128])
    want = torch.bfloat16 if bf16_units else torch.float32
    assert optim.ns_dtype(cpu, big) == want and optim.ns_dtype(cpu, small) == torch.float32
    assert optim.ns_dtype(torch.device("cuda"), small) == torch.bfloat16  # GPUs: always, as before
    assert (
        optim.ns_dtype(cpu, big, "float32") == torch.float32
        and optim.ns_dtype(cpu, small, "bfloat16") == torch.bfloat16
    )
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(big))
    W.grad = torch.randn(big)
    before = W.detach().clone()
    Muon([W], lr=0.1, momentum=0.0, nesterov=False).step()
    expected = before.add(
        newton_schulz(W.grad, 5, dtype=want), alpha=-0.1 * (272 / 256) ** 0.5
    )  # tall: lr x sqrt(rows/cols)
    assert torch.equal(W.detach(), expected)


def test_muon_ns_dtype_key_reaches_the_optimizer_and_is_checked():
    settings = {"optimizer": "muon", "muon_ns_dtype": "bfloat16"}
    assert optim.build_optimizer(tiny(), settings, "cpu").optimizers[0].ns_dtype == "bfloat16"
    assert optim.build_optimizer(tiny(), {"optimizer": "muon"}, "cpu").optimizers[0].ns_dtype == "auto"
    assert TrainConfig().muon_ns_dtype == "auto"
    with pytest.raises(UserError, match="muon_ns_dtype"):
        TrainConfig(muon_ns_dtype="float16")


def test_muon_refuses_vectors_and_split_puts_only_block_matrices_in_muon():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])
    model = tiny(**MODERN)
    muon, adamw = muon_param_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 and names[id(p)].startswith("transformer.h.") for p in muon)
    assert {names[id(p)] for p in adamw if p.dim() == 2} == {"transformer.wte.weight", "lm_head.weight"}
    assert len(muon) + len(adamw) == len(list(model.parameters()))


def test_combined_optimizer_drives_both_with_one_schedule_and_round_trips():
    model = tiny()
    opt = configure_muon(model, 0.0, 1e-3, (0.9, 0.95), "cpu", muon_lr=0.02)
    assert isinstance(opt, CombinedOptimizer) and len(opt.param_groups) == 3
    for group in opt.param_groups:
        group["lr"] = 5e-4  # as the training loop does: half the peak
    muon = opt.optimizers[0].param_groups[0]
    assert muon["lr"] * muon["lr_scale"] == pytest.approx(0.01)  # Muon's peak scaled the same way
    idx = torch.randint(0, 50, (2, 16))
    model(idx, idx)[1].backward()
    opt.step()
    fresh = configure_muon(model, 0.0, 1e-3, (0.9, 0.95), "cpu")
    fresh.load_state_dict(opt.state_dict())
    assert len(fresh.state) == len(opt.state) > 0
    with pytest.raises(ValueError, match="Muon"):
        fresh.load_state_dict(model.configure_optimizers(0.0, 1e-3, (0.9, 0.95), "cpu").state_dict())


def test_muons_adamw_steps_and_saves_as_torchs_fused_adamw_does():
    """Muon's companion AdamW (optim.FusedAdamW) runs torch's fused kernel outside torch.optim: the
    same bits as torch.optim.AdamW(fused=True) step by step (a skipped step and a scaled gradient
    among them), and either one's state_dict loads into the other and steps on alike."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]

    def groups(params):
        return [{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}]

    mine = optim.FusedAdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95))
    torch_s = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), fused=True)

    def step_both(found_inf=0.0, grad_scale=None):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        for opt in (mine, torch_s):
            opt.found_inf, opt.grad_scale = torch.tensor(found_inf), grad_scale
            opt.step()
        assert all(torch.equal(p, q) for p, q in zip(ours, theirs))

    step_both()
    step_both(found_inf=1.0)  # skipped: nothing moves, the step counts included
    step_both(grad_scale=torch.tensor(4.0))
    assert [s["step"].item() for s in mine.state.values()] == [2.0, 2.0]
    for s, t in zip(mine.state_dict()["state"].values(), torch_s.state_dict()["state"].values()):
        assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    # Each loads the other's state as a resumed run does (load_moments: the moments from the file,
    # settings such as torch's fused=True from the run), and they go on stepping alike.
    mine2 = optim.FusedAdamW(groups(ours), lr=1e-2)
    optim.load_moments(mine2, lambda: mine2.load_state_dict(torch_s.state_dict()))
    torch_s2 = torch.optim.AdamW(groups(theirs), lr=1e-2, fused=True)
    optim.load_moments(torch_s2, lambda: torch_s2.load_state_dict(mine.state_dict()))
    mine, torch_s = mine2, torch_s2
    assert mine.param_groups[0]["betas"] == torch_s.param_groups[0]["betas"] == (0.9, 0.999)  # the run's
    step_both()
    with pytest.raises(ValueError, match="groups"):
        optim.FusedAdamW([ours[0]]).load_state_dict(torch_s.state_dict())
    # Saved in another precision (or on another device): moved to the parameters' (the count float32).
    saved = torch_s.state_dict()
    saved["state"] = {n: {k: v.double() for k, v in s.items()} for n, s in saved["state"].items()}
    mine.load_state_dict(saved)
    assert all(v.dtype == torch.float32 for s in mine.state.values() for v in s.values())


def test_a_muon_run_trains_saves_and_resumes_without_importing_dynamo_or_dtensor(tiny_cfg):
    """Building or stepping any torch.optim optimizer imports torch._dynamo (0.6 s on a 2-vCPU
    machine, a tenth of the CPU speedrun); a Muon run's optimizers (Muon, optim.FusedAdamW) don't.
    Nor does a single process import torch.distributed.tensor (another 0.6 s) to look for DTensors."""
    cfg = tiny_cfg()
    keys = TINY | dict(dataset=cfg.dataset, out_dir=cfg.out_dir, optimizer="muon", max_iters=6, eval_interval=3)
    args = [f"--{k}={v}" for k, v in keys.items()]
    script = (
        "import sys\n"
        "from gptsmith.trainer import main\n"
        f"main({args!r})\n"
        f"main({[*args, '--init_from=resume', '--max_iters=8', '--lr_decay_iters=8']!r})\n"
        "print('imported:', [m for m in ('torch._dynamo', 'torch.distributed.tensor') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "iter 7: loss" in out  # the resumed run trained on
    assert "imported: []" in out


def test_muon_ns_steps_reaches_the_optimizer_and_fewer_steps_orthogonalise_less():
    opt = configure_muon(tiny(), 0.0, 1e-3, (0.9, 0.95), "cpu", ns_steps=3)
    assert opt.optimizers[0].param_groups[0]["ns_steps"] == 3
    g = torch.Generator().manual_seed(1)
    G = torch.randn(64, 16, generator=g) @ torch.diag(torch.logspace(-3, 0, 16)) @ torch.randn(16, 16, generator=g)
    spread = [torch.linalg.svdvals(newton_schulz(G, steps=n)).min().item() for n in (1, 3, 5)]
    assert spread[0] < spread[1] < spread[2]  # the smallest singular values climb towards 1 step by step
    with pytest.raises(UserError, match="muon_ns_steps"):
        TrainConfig(muon_ns_steps=0)


def test_muon_with_fsdp_and_unknown_optimizers_are_refused():
    with pytest.raises(UserError, match="fsdp"):
        TrainConfig(optimizer="muon", parallel="fsdp", dtype="bfloat16")
    with pytest.raises(UserError, match="optimizer"):
        TrainConfig(optimizer="sgd")


# Learning-rate schedules


def test_wsd_schedule_at_its_boundaries():
    cfg = TrainConfig(
        lr_schedule="wsd",
        learning_rate=1.0,
        min_lr=0.1,
        warmup_iters=10,
        lr_decay_iters=100,
        max_iters=100,
        decay_frac=0.2,
    )
    assert get_lr(0, cfg) == pytest.approx(1 / 11)  # warmup starts above zero
    assert get_lr(9, cfg) == pytest.approx(10 / 11)  # the last warmup step
    assert get_lr(10, cfg) == 1.0 and get_lr(79, cfg) == 1.0  # stable
    assert get_lr(80, cfg) == 1.0  # decay starts at 100 - 0.2 * 100 from the peak...
    assert get_lr(90, cfg) == pytest.approx(0.55)  # ...linearly...
    assert get_lr(99, cfg) == pytest.approx(1.0 - 0.9 * 19 / 20)
    assert get_lr(100, cfg) == 0.1 and get_lr(1000, cfg) == 0.1  # ...to min_lr, and stays there
    # A decay longer than the time after warmup starts right after it.
    long = dataclasses.replace(cfg, decay_frac=1.0)
    assert get_lr(10, long) == 1.0 and get_lr(55, long) == pytest.approx(0.55)


def test_cosine_stays_the_default():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert cfg.lr_schedule == "cosine"
    assert get_lr(60, cfg) == pytest.approx(0.55) and get_lr(10, cfg) == 1.0 and get_lr(110, cfg) == 0.1


def test_bad_schedule_keys_are_refused():
    with pytest.raises(UserError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(UserError, match="decay_frac"):
        TrainConfig(lr_schedule="wsd", decay_frac=0.0)
