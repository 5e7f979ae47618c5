"""The outer optimizers (issue 14) in float64 against closed forms written here, independently of
nl_pretrain/optim/rules.py: Newton-Schulz as a polynomial of the singular values, Muon, M3 (both
variants, the slow momentum's timing), delta momentum with an explicit (alpha I - G^T G / ||G||^2),
DMGD's memory step against autograd and its falling internal loss; parameter roles; config errors."""
import math

import pytest
import torch

from nl_pretrain.config import ConfigError, OptimConfig, build_config
from nl_pretrain.model import LanguageModel
from nl_pretrain.optim import ModelOptimizer, build_optimizer, optimizer_groups, param_role
from nl_pretrain.optim.rules import NS_COEFFS, dmgd_init, newton_schulz

D = torch.float64


def ns_closed_form(g, steps=5):
    """Newton-Schulz acts on the singular values only: U p^steps(s / (||g||_F + 1e-7)) V^T."""
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    x = s / (torch.linalg.norm(g) + 1e-7)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        x = a * x + b * x ** 3 + c * x ** 5
    return u @ torch.diag(x) @ vh


def cfg_with(name, **sections):
    tree = {"name": name, "lr": 0.01, "weight_decay": 0.1, "warmup_steps": 0, **sections}
    return build_config({"optim": tree}).optim


def one_matrix(name, shape=(6, 10), seed=0, **sections):
    """A 2-D weight and a 1-D gain under optimizer ``name``; a fixed float64 gradient stream."""
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(*shape, dtype=D))
    b = torch.nn.Parameter(torch.randn(shape[0], dtype=D))
    cfg = cfg_with(name, **sections)
    opt = build_optimizer(optimizer_groups([("layer.w_up.weight", w), ("layer.norm.weight", b)], cfg), cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    grads = [(torch.randn(*shape, generator=gen, dtype=D), torch.randn(shape[0], generator=gen, dtype=D))
             for _ in range(8)]
    return w, b, cfg, opt, grads


def run(opt, w, b, grads, n):
    for gw, gb in grads[:n]:
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()


def adamw_closed_form(x, grads, lr, wd, b1, b2, eps):
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    for t, g in enumerate(grads, 1):
        x = x * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = x - lr * (m / (1 - b1 ** t)) / (torch.sqrt(v / (1 - b2 ** t)) + eps)
    return x


# ---------------------------------------------------------------------------------- Newton-Schulz
@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (24, 24)])
def test_newton_schulz_is_close_to_orthogonal(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape, dtype=D)
    o = newton_schulz(g, 5)
    torch.testing.assert_close(o, ns_closed_form(g), rtol=1e-9, atol=1e-9)
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.6 and s.max() < 1.25, s          # the quintic's known band around 1
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.linalg.norm(o - u @ vh) / torch.linalg.norm(u @ vh) < 0.3
    assert float(torch.linalg.svdvals(newton_schulz(g, 12)).sub(1).abs().max()) < 0.35


# ------------------------------------------------------------------------------------------ Muon
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_steps_match_closed_form(n, nesterov):
    w, b, cfg, opt, grads = one_matrix("muon", muon={"nesterov": nesterov})
    w0, b0 = w.detach().clone(), b.detach().clone()
    run(opt, w, b, grads, n)
    beta, lr, wd = cfg.muon.momentum, cfg.lr, cfg.weight_decay
    x, buf = w0.clone(), torch.zeros_like(w0)
    for gw, _ in grads[:n]:
        buf = beta * buf + (1 - beta) * gw
        m = (1 - beta) * gw + beta * buf if nesterov else buf
        x = x * (1 - lr * wd) - lr * 0.2 * math.sqrt(10) * ns_closed_form(m)
    torch.testing.assert_close(w.detach(), x, rtol=1e-10, atol=1e-10)
    # the gain is 1-D: AdamW, without weight decay
    ref = adamw_closed_form(b0, [gb for _, gb in grads[:n]], lr, 0.0, cfg.beta1, cfg.beta2, cfg.eps)
    torch.testing.assert_close(b.detach(), ref, rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------------------------------------- M3
@pytest.mark.parametrize("variant", ["printed", "ema"])
def test_m3_steps_match_algorithm_1(variant):
    f, n = 3, 7
    w, b, cfg, opt, grads = one_matrix("m3", m3={"variant": variant, "frequency": f, "scale": "none",
                                                 "alpha": 0.5, "beta3": 0.8})
    w0 = w.detach().clone()
    run(opt, w, b, grads, n)
    c, lr, wd = cfg.m3, cfg.lr, cfg.weight_decay
    x = w0.clone()
    m1, v, m2 = (torch.zeros_like(x) for _ in range(3))
    o2 = torch.zeros_like(x)
    for t in range(1, n + 1):
        g = grads[t - 1][0]
        if variant == "printed":
            m1, v = m1 + c.beta1 * g, v + c.beta2 * g * g
            vhat = v
        else:
            m1, v = c.beta1 * m1 + (1 - c.beta1) * g, c.beta2 * v + (1 - c.beta2) * g * g
            vhat = v / (1 - c.beta2 ** t)
        x = x * (1 - lr * wd) - lr * (ns_closed_form(m1) + c.alpha * o2) / (vhat.sqrt() + c.eps)
        if t % f == 0:                      # the sum of the last f gradients, once, for the next f steps
            block = sum(grads[i][0] for i in range(t - f, t))
            m2 = m2 + c.beta3 * block if variant == "printed" else c.beta3 * m2 + (1 - c.beta3) * block
            o2 = ns_closed_form(m2)
    torch.testing.assert_close(w.detach(), x, rtol=1e-9, atol=1e-9)


def test_m3_slow_momentum_updates_exactly_every_f_steps():
    f = 3
    w, b, cfg, opt, grads = one_matrix("m3", m3={"frequency": f})
    changed = []
    for t, (gw, gb) in enumerate(grads, 1):
        before = opt.state[w]["m2"].clone() if opt.state.get(w) else torch.zeros_like(w)
        w.grad, b.grad = gw, gb
        opt.step()
        changed.append(not torch.equal(opt.state[w]["m2"], before))
    assert changed == [t % f == 0 for t in range(1, len(grads) + 1)]


# ------------------------------------------------------------------------------------ delta momentum
@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])      # both associations of the decay term
@pytest.mark.parametrize("orth", [True, False])
def test_delta_momentum_matches_eq_48_49(shape, orth):
    w, b, cfg, opt, grads = one_matrix("delta_momentum", shape=shape, delta_momentum={"orthogonalize": orth})
    w0 = w.detach().clone()
    run(opt, w, b, grads, 4)
    a, lr, wd = cfg.delta_momentum.alpha, cfg.lr, cfg.weight_decay
    x, m = w0.clone(), torch.zeros_like(w0)
    eye = torch.eye(shape[1], dtype=D)
    for gw, _ in grads[:4]:
        m = m @ (a * eye - gw.T @ gw / (gw * gw).sum()) + gw
        step = 0.2 * math.sqrt(max(shape)) * ns_closed_form(m) if orth else m
        x = x * (1 - lr * wd) - lr * step
    torch.testing.assert_close(w.detach(), x, rtol=1e-10, atol=1e-10)


def test_delta_momentum_decay_is_contractive():
    torch.manual_seed(0)
    g, m = torch.randn(8, 12, dtype=D), torch.randn(8, 12, dtype=D)
    for a in (0.5, 0.9, 1.0):
        decayed = m @ (a * torch.eye(12, dtype=D) - g.T @ g / (g * g).sum())
        assert torch.linalg.norm(decayed) <= a * torch.linalg.norm(m) + 1e-12


# ------------------------------------------------------------------------------------------ DMGD
def dmgd_loss(w1, w2, keys):
    return 0.5 * ((torch.tanh(keys @ w1.T) @ w2.T - keys) ** 2).sum() / keys.shape[0]


def test_dmgd_step_matches_autograd_closed_form():
    w, b, cfg, opt, grads = one_matrix("dmgd", dmgd={"hidden": 4, "lr": 0.3, "decay": 0.9})
    w0 = w.detach().clone()
    w1, w2 = dmgd_init("layer.w_up.weight", 6, 10, 4, D, "cpu")
    assert w1.shape == (4, 10) and torch.allclose(w1 @ w1.T, torch.eye(4, dtype=D))
    x = w0.clone()
    run(opt, w, b, grads, 3)
    for gw, _ in grads[:3]:
        s = gw.pow(2).mean().sqrt()
        keys = gw / s
        p1, p2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
        g1, g2 = torch.autograd.grad(dmgd_loss(p1, p2, keys), (p1, p2))
        w1, w2 = 0.9 * w1 - 0.3 * g1, 0.9 * w2 - 0.3 * g2
        d = torch.tanh(keys @ w1.T) @ w2.T * s
        x = x * (1 - cfg.lr * cfg.weight_decay) - cfg.lr * 0.2 * math.sqrt(10) * ns_closed_form(d)
    torch.testing.assert_close(opt.state[w]["rep:w1"], w1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.detach(), x, rtol=1e-9, atol=1e-9)


def test_dmgd_memory_is_trained_and_bounded():
    """On a fixed stream of low-rank gradients the internal L2 loss falls; state <= 2 x AdamW's."""
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 3, dtype=D))[0].T        # 3 directions in R^32
    w = torch.nn.Parameter(torch.randn(16, 32, dtype=D))
    cfg = cfg_with("dmgd", dmgd={"hidden": 8, "lr": 0.5})
    opt = build_optimizer(optimizer_groups([("blk.w_o.weight", w)], cfg), cfg)
    stream = [torch.randn(16, 3, dtype=D) @ basis for _ in range(5)]
    for i in range(60):
        w.grad = stream[i % 5].clone()
        opt.step()
    losses = opt.inner_losses["blk.w_o.weight"]
    passes = [sum(losses[i:i + 5]) / 5 for i in range(0, 60, 5)]             # mean over each pass of the stream
    assert passes[-1] < 0.25 * passes[0], passes
    assert max(passes[6:]) < min(passes[:3]), passes
    state = sum(t.numel() for k, t in opt.state[w].items() if k != "step")
    assert state <= 2 * w.numel()


# ----------------------------------------------------------------------------------- parameter roles
def test_parameter_roles_on_hope():
    cfg = build_config({"model": {"preset": "hope-tiny"}, "optim": {"name": "muon"}})
    with torch.device("meta"):
        model = LanguageModel(cfg.model)
    roles = {n: param_role(n, p, "muon") for n, p in model.named_parameters()}
    matrices = {n for n, r in roles.items() if r == "matrix"}
    for n, p in model.named_parameters():
        short = n.split(".")[-2] if n.endswith((".weight", ".bias")) else n.split(".")[-1]
        expect = (p.ndim == 2 and not n.startswith(("embed", "lm_head")) and "init" not in n
                  and short not in ("out_norm", "beta_logit"))
        assert (n in matrices) == expect, (n, tuple(p.shape), roles[n])
    assert "blocks.0.mixer.w_q.weight" in matrices and "blocks.0.levels.1.mlp.w_down.weight" in matrices
    for n in ("embed.weight", "blocks.0.norm.weight", "blocks.0.mixer.out_norm", "blocks.0.mixer.conv_q.weight",
              "blocks.0.mixer.main_init.weights.0", "blocks.0.mixer.eta_bias"):
        assert roles[n] == "adamw", n
    assert all(param_role(n, p, "adamw") == "adamw" for n, p in model.named_parameters())


def test_model_optimizer_uses_the_rule_for_every_step_and_slow_levels():
    cfg = build_config({"model": {"preset": "hope-tiny", "d_model": 32, "n_heads": 2, "n_layers": 1,
                                  "vocab_size": 64, "cms": [{"kind": "step", "period": 1},
                                                            {"kind": "step", "period": 2}]},
                        "data": {"seq_len": 8}, "optim": {"name": "m3"}})
    torch.manual_seed(0)
    model = LanguageModel(cfg.model)
    opt = ModelOptimizer(model, cfg.optim, cfg.model.cms)
    rules = {g["rule"] for g in opt.base.param_groups}
    assert rules == {"adamw", "m3"}
    assert {g["rule"] for g in opt.slow[1]["opt"].param_groups} == {"m3"}        # a SwiGLU: matrices only
    for step in range(2):
        ids = torch.randint(0, 64, (2, 8))
        model.loss(ids, ids.roll(-1, 1)).backward()
        opt.step(step, 1e-3)
        opt.zero_grad()
    slow_w = model.blocks[0].levels[1].mlp.w_up.weight
    assert int(opt.slow[1]["opt"].state[slow_w]["step"]) == 1      # one update after two steps


# ------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("override, message", [
    ({"name": "sgd"}, "optim.name='sgd' is not one of ['adamw', 'muon', 'm3', 'delta_momentum', 'dmgd']"),
    ({"m3": {"frequency": 0}}, "optim.m3.frequency=0 must be > 0"),
    ({"m3": {"variant": "eq75"}}, "optim.m3.variant='eq75' is not one of ['ema', 'printed']"),
    ({"muon": {"momentum": 1}}, "optim.muon.momentum=1.0 must be in [0, 1)"),
    ({"delta_momentum": {"alpha": 0}}, "optim.delta_momentum.alpha=0.0 must be in (0, 1]"),
    ({"dmgd": {"hidden": 0}}, "optim.dmgd.hidden=0 must be > 0"),
    ({"dmgd": {"width": 4}}, "unknown key 'optim.dmgd.width' in optim.dmgd; allowed: decay, hidden, lr, "
                             "ns_steps, orthogonalize, scale, seed"),
])
def test_config_errors(override, message):
    with pytest.raises(ConfigError) as e:
        build_config({"optim": override})
    assert str(e.value) == message


@pytest.mark.parametrize("level, message", [
    ({"kind": "step", "optimizer": "sgd"},
     "model.cms[0].optimizer='sgd' is not one of ['', 'adamw', 'muon', 'm3', 'delta_momentum', 'dmgd']"),
    ({"kind": "context", "period": 4, "optimizer": "muon"},
     "model.cms[0].optimizer='muon' applies to step levels only (a context level's weights are fast weights "
     "updated by its inner rule); remove it"),
])
def test_level_optimizer_config_errors(level, message):
    with pytest.raises(ConfigError) as e:
        build_config({"model": {"cms": [level]}})
    assert str(e.value) == message
    assert OptimConfig().name == "adamw" and build_config({}).model.cms[0].optimizer == ""


# --------------------------------------------------------------------- CMS levels with their own rule
def level_rules_model():
    """Transformer++-tiny-like, float64: AdamW for the run, CMS level 0 (every step, lr x 0.5) with
    Muon, level 1 (period 2, phase 0: updates after steps 1 and 3) with delta momentum."""
    cfg = build_config({"model": {"preset": "transformer-tiny", "d_model": 16, "n_heads": 2, "n_layers": 1,
                                  "vocab_size": 32, "max_seq_len": 8,
                                  "cms": [{"kind": "step", "period": 1, "expansion": 2.0, "optimizer": "muon",
                                           "lr_scale": 0.5},
                                          {"kind": "step", "period": 2, "expansion": 2.0,
                                           "optimizer": "delta_momentum"}]},
                        "data": {"seq_len": 8},
                        "optim": {"name": "adamw", "lr": 0.02, "warmup_steps": 0, "grad_clip": 0.0,
                                  "weight_decay": 0.1, "muon": {"nesterov": False}}})
    torch.manual_seed(0)
    return cfg, LanguageModel(cfg.model).double()


def test_cms_levels_with_their_own_optimizer_match_closed_forms():
    from nl_pretrain.optim import lr_at
    cfg, model = level_rules_model()
    opt = ModelOptimizer(model, cfg.optim, cfg.model.cms)
    fast, slow = (model.blocks[0].levels[i].mlp.w_up.weight for i in (0, 1))
    attn = model.blocks[0].mixer.w_q.weight if hasattr(model.blocks[0].mixer, "w_q") else None
    x_fast, x_slow = fast.detach().clone(), slow.detach().clone()
    gen = torch.Generator().manual_seed(3)
    fast_grads, slow_grads, lrs = [], [], []
    for step in range(4):
        ids = torch.randint(0, 32, (2, 8), generator=gen)
        model.loss(ids, ids.roll(-1, 1)).backward()
        fast_grads.append(fast.grad.clone())
        slow_grads.append(slow.grad.clone())
        lrs.append(lr_at(step, cfg.optim, cfg.train.steps))
        opt.step(step, lrs[-1])
        opt.zero_grad()
    wd, c = cfg.optim.weight_decay, cfg.optim
    buf = torch.zeros_like(x_fast)                        # Muon (no Nesterov) at lr x 0.5, every step
    for g, lr in zip(fast_grads, lrs):
        buf = c.muon.momentum * buf + (1 - c.muon.momentum) * g
        x_fast = x_fast * (1 - 0.5 * lr * wd) - 0.5 * lr * 0.2 * math.sqrt(max(x_fast.shape)) * ns_closed_form(buf)
    torch.testing.assert_close(fast.detach(), x_fast, rtol=1e-10, atol=1e-10)
    m = torch.zeros_like(x_slow)                          # delta momentum on the sums of steps (0, 1), (2, 3)
    eye = torch.eye(x_slow.shape[1], dtype=D)
    for j in (1, 3):
        g = slow_grads[j - 1] + slow_grads[j]
        m = m @ (c.delta_momentum.alpha * eye - g.T @ g / (g * g).sum()) + g
        x_slow = x_slow * (1 - lrs[j] * wd) - lrs[j] * 0.2 * math.sqrt(max(x_slow.shape)) * ns_closed_form(m)
    torch.testing.assert_close(slow.detach(), x_slow, rtol=1e-10, atol=1e-10)
    # every other matrix keeps the run's AdamW: its moments, not a rule's state
    other = attn if attn is not None else model.blocks[0].mixer.w_o.weight
    assert set(opt.base.state[other]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.base.state[fast]) == {"step", "momentum"}
    assert set(opt.slow[1]["opt"].state[slow]) == {"step", "momentum"}


def test_info_lists_the_level_optimizers():
    from nl_pretrain.optim.optimizer import role_summary
    cfg, _ = level_rules_model()
    lines = role_summary(cfg.model, cfg.optim)
    assert lines[:3] == ["optimizer adamw", "  CMS level 0 (step, period 1): optimizer muon, lr x 0.5",
                         "  CMS level 1 (step, period 2): optimizer delta_momentum, lr x 1"]
    muon = lines.index(next(line for line in lines if line.startswith("  muon:")))
    assert lines[muon + 1:muon + 4] == [f"    blocks.*.levels.0.mlp.{w}.weight (x1)" for w in ("w_down", "w_gate", "w_up")]
