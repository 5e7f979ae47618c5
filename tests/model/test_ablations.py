"""The Table 6 switches (docs/MODEL.md D21): each one means what its documentation says, exactly,
and the chunk-parallel layer equals the token-by-token reference under every switch."""
import math

import pytest
import torch

import nl_pretrain.model.smt as smt_module
from kernels.memory import naive
from nl_pretrain.config import ConfigError, ModelConfig, load_config
from nl_pretrain.model import LanguageModel
from nl_pretrain.model.cms import StepLevel
from nl_pretrain.model.layers import l2norm
from nl_pretrain.model.memories import to_rows
from nl_pretrain.model.smt import SelfModifyingTitans
from nl_pretrain.model.smt_reference import smt_sequential
from nl_pretrain.presets import preset_model_dict

DT = torch.float64
SMALL = dict(d_model=16, n_heads=2, n_layers=1, vocab_size=64, max_seq_len=64, memory_impl="torch",
             chunk_mem=4, chunk_proj=4)


def hope_cfg(preset="hope-tiny", **kw):
    d = preset_model_dict(preset)
    d.update(SMALL)
    d["cms"] = [dict(lvl, period=4) if lvl["kind"] == "context" else lvl for lvl in d["cms"]]
    d.update(kw)
    from nl_pretrain.config import _from_dict
    return _from_dict(ModelConfig, d)


def model_for(cfg, seed=0):
    torch.manual_seed(seed)
    m = LanguageModel(cfg).double()
    with torch.no_grad():                      # larger-than-init weights so every path carries signal
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def tokens(T=22, B=2):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(3))


def layer_for(**kw):
    base = dict(d_model=16, n_heads=2, memory_impl="torch", memory_expansion=2.0, eta_max=1.0, mlp_eta_scale=1.0,
                rule="gd", chunk_mem=4, chunk_proj=3)
    base.update(kw)
    torch.manual_seed(1)
    layer = SelfModifyingTitans(ModelConfig(**base)).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def test_no_momentum_equals_momentum_with_beta_zero():
    """momentum=false: S_t = -eta_t grad, i.e. momentum with beta = 0 (sigmoid(-inf) = 0 exactly)."""
    with_mom = model_for(hope_cfg())
    without = model_for(hope_cfg("hope-tiny+no_momentum"))
    without.load_state_dict(with_mom.state_dict())
    with torch.no_grad():
        for name, p in with_mom.named_parameters():
            if name.endswith("beta_logit"):
                p.fill_(-math.inf)
    x = tokens()
    torch.testing.assert_close(without(x), with_mom(x), rtol=1e-12, atol=1e-12)


def test_no_retention_equals_alpha_one():
    """retention=false: alpha_t = 1 in every memory (projection, main, CMS context level): the limit
    of a retention gate saturated at 1 (bias +inf), with the alpha memory and gates removed."""
    kept = model_for(hope_cfg())
    dropped = model_for(hope_cfg("hope-tiny+no_retention"))
    names = set(dict(dropped.named_parameters()))
    assert not any("alpha" in n for n in names)      # no alpha memory, no w_alpha anywhere
    state = {}
    for name, p in kept.state_dict().items():
        if name.endswith("mixer.beta_logit"):        # columns k, v, eta, alpha, mem -> k, v, eta, mem
            state[name] = p[:, [0, 1, 2, 4]]
        elif name in names:
            state[name] = p
    dropped.load_state_dict(state)
    with torch.no_grad():
        for name, p in kept.named_parameters():
            if name.endswith("alpha_bias") or name.endswith("w_alpha.bias"):
                p.fill_(math.inf)
    x = tokens()
    torch.testing.assert_close(dropped(x), kept(x), rtol=1e-12, atol=1e-12)


def test_rules_are_the_written_updates():
    """gd (our presets; Table 6 'w/o DGD'): M' = alpha M - eta (M k - v) k^T; +dgd (Eq. 88) adds
    the erase -eta M k k^T. One token, float64, against the formulas written here."""
    torch.manual_seed(0)
    M, k, v = torch.randn(3, 5, 4, dtype=DT), l2norm(torch.randn(3, 4, dtype=DT)), torch.randn(3, 5, dtype=DT)
    eta, alpha = torch.rand(3, dtype=DT), torch.rand(3, dtype=DT)
    e, a = eta[:, None, None], alpha[:, None, None]
    err = torch.einsum("nod,nd->no", M, k) - v
    gd = a * M - e * err[:, :, None] * k[:, None, :]
    dgd = gd - e * torch.einsum("nod,nd->no", M, k)[:, :, None] * k[:, None, :]
    for rule, want in (("gd", gd), ("dgd", dgd)):
        spec = naive.MemorySpec(kind="linear", rule=rule, loss="l2", grad_at="chunk_start", momentum=False)
        from kernels.memory import memory_chunk
        _, (got,), _ = memory_chunk(spec, (M,), None, k[:, None], v[:, None], eta[:, None], alpha[:, None], None,
                                    None, impl="torch")
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    cfg = hope_cfg("hope-tiny+dgd")
    m = LanguageModel(cfg)
    assert cfg.rule == "dgd" and hope_cfg().rule == "gd"
    specs = [mod.spec if hasattr(mod, "spec") else s for mod in m.modules()
             for s in ([mod.proj_spec, mod.main_spec] if isinstance(mod, SelfModifyingTitans) else [None])]
    assert specs and all(s.rule == "dgd" for s in specs if s is not None)


def test_no_cms_is_one_ordinary_mlp():
    """+no_cms: every block is x + SMT(norm x), then z + SwiGLU(norm z) of Transformer++'s width."""
    cfg = hope_cfg("hope-tiny+no_cms")
    m = model_for(cfg)
    for block in m.blocks:
        assert len(block.levels) == 1 and isinstance(block.levels[0], StepLevel) and block.levels[0].period == 1
        assert block.levels[0].mlp.w_gate.out_features == 4 * cfg.d_model     # transformer-tiny expansion 4
    x = torch.randn(2, 10, 16, dtype=DT)
    b = m.blocks[0]
    h = x + b.mixer(b.norm(x))
    torch.testing.assert_close(b(x), h + b.levels[0].mlp(b.level_norms[0](h)), rtol=0, atol=0)


def _spy(monkeypatch):
    """The arguments every main-memory call receives (the real operator still runs)."""
    seen = []
    real = smt_module.memory_sequence

    def spy(spec, state, mom, k, v, eta, alpha, beta, q, chunk, **kw):
        seen.append(dict(state=state, k=k, v=v, eta=eta, alpha=alpha, q=q))
        return real(spec, state, mom, k, v, eta, alpha, beta, q, chunk, **kw)
    monkeypatch.setattr(smt_module, "memory_sequence", spy)
    return seen


@pytest.mark.parametrize("which", ["k", "v"])
def test_static_k_or_v_is_the_identity_on_u(which, monkeypatch):
    """Without the adaptive k (v) memory, the main memory's keys (values) and the keys (values) every
    projection memory is written with are u itself, the static projection ``l2norm(silu(conv(x W_u)))``
    the adaptive memories read: that memory, its parameters and its momentum beta do not exist."""
    layer = layer_for(projection_memories=[m for m in ("k", "v", "eta", "alpha") if m != which])
    assert which not in layer.proj_init and not hasattr(layer, "w_" + which) and not hasattr(layer, "conv_" + which)
    assert layer.beta_logit.shape[1] == 4 and which not in layer.initial(2)[0]
    seen = _spy(monkeypatch)
    x = torch.randn(2, 11, 16, dtype=DT)
    layer(x)
    u = layer.inputs(x)
    torch.testing.assert_close(seen[0][which], u, rtol=0, atol=0)
    other = "v" if which == "k" else "k"                       # the adaptive one still varies by chunk
    assert not torch.allclose(seen[0][other], l2norm(u) if other == "k" else u)


def test_adaptive_q_is_a_memory_trained_like_the_others(monkeypatch):
    """+adaptive_q: q_t = l2norm(M_q,ref(u_t)) at the chunk-start state of a q memory that is written
    like k and v (same keys, eta, alpha; self-generated target M_q,ref(l2norm v)); checked for the
    first two chunks against the token-by-token update of kernels/memory/naive.py (a linear main
    memory with the running gradient receives eta unscaled, so its inputs are the pass's outputs)."""
    layer = layer_for(projection_memories=["q", "k", "v", "eta", "alpha"], chunk_proj=4, main_memory="linear")
    assert not hasattr(layer, "w_q") and "q" in layer.proj_init
    seen = _spy(monkeypatch)
    x = torch.randn(2, 8, 16, dtype=DT)
    layer(x)
    got = seen[0]
    u = layer.inputs(x)
    B = x.shape[0]
    P0 = layer.proj_init["q"].expand(B)
    torch.testing.assert_close(got["q"][:, :4], l2norm(u[:, :4] @ P0[0].transpose(1, 2)), rtol=1e-13, atol=1e-13)
    spec = layer.proj_spec
    vhat = l2norm(got["v"][:, :4]) @ P0[0].transpose(1, 2)
    i = layer.proj_memories.index("q")
    beta = layer.betas(B)[i]
    mom = tuple(torch.zeros_like(w) for w in P0)
    _, P1, _ = naive.memory_chunk(spec, P0, mom, got["k"][:, :4], vhat, layer.chunk_eta(spec, got["eta"][:, :4], 4),
                                  got["alpha"][:, :4], beta)
    torch.testing.assert_close(got["q"][:, 4:], l2norm(u[:, 4:] @ P1[0].transpose(1, 2)), rtol=1e-12, atol=1e-12)


SWITCHES = [dict(projection_memories=["v", "eta", "alpha"]), dict(projection_memories=["k", "eta", "alpha"]),
            dict(projection_memories=["q", "k", "v", "eta", "alpha"]), dict(retention=False),
            dict(momentum=False, retention=False, projection_memories=["q", "v", "eta", "alpha"]),
            dict(proj_memory="mlp", projection_memories=["q", "k", "eta", "alpha"]),
            dict(projection_memories=["v", "eta", "alpha"], proj_target_match=True),
            dict(proj_target_match=True), dict(proj_memory="mlp", proj_target_match=True)]


@pytest.mark.parametrize("kw", SWITCHES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_switches_chunk_parallel_equals_token_reference(kw):
    layer = layer_for(**kw)
    x = torch.randn(2, 11, 16, dtype=DT)               # T = 11: no chunk size divides it
    y = layer(x)
    torch.testing.assert_close(y, smt_sequential(layer, x), rtol=1e-10, atol=1e-11)
    layer.cfg.memory_impl = "reference"
    from nl_pretrain.model.memories import ResolvedImpl
    layer.impl = ResolvedImpl("reference")
    torch.testing.assert_close(layer(x), y, rtol=1e-10, atol=1e-11)


def test_switch_errors_name_the_value():
    with pytest.raises(ValueError, match=r"^unknown switch '\+nope' in preset 'hope-tiny\+nope'; choose from: "
                                         r"\+dgd, \+no_momentum"):
        load_config(None, ["--model.preset=hope-tiny+nope"])
    with pytest.raises(ValueError, match=r"^preset 'titans-tiny\+static_k': \+static_k does not apply to the titans"):
        load_config(None, ["--model.preset=titans-tiny+static_k"])
    with pytest.raises(ConfigError, match=r"^model.projection_memories=\['k', 'w'\]: each entry must be one of "
                                          r"\['q', 'k', 'v', 'eta', 'alpha'\], at most once$"):
        load_config(None, ["--model.preset=hope-tiny", "--model.projection_memories=[k, w]"])


def test_context_target_norm_writes_unit_targets(monkeypatch):
    """model.context_target_norm (docs/MODEL.md §6): a CMS context level's memory is written towards
    ``l2norm(z W_T)`` per head instead of ``z W_T``; everything else about the level is unchanged. On by
    default (every preset with a context level)."""
    assert hope_cfg().context_target_norm and hope_cfg("hope_attention-tiny").context_target_norm
    import nl_pretrain.model.cms as cms_module
    from nl_pretrain.model.cms import ContextLevel
    seen, real = [], cms_module.memory_sequence

    def spy(spec, state, mom, k, v, *args, **kw):
        seen.append((k, v))
        return real(spec, state, mom, k, v, *args, **kw)
    monkeypatch.setattr(cms_module, "memory_sequence", spy)
    z = torch.randn(2, 10, 16, dtype=DT)
    outs = []
    for on in (False, True):
        m = model_for(hope_cfg(context_target_norm=on))
        level = next(lv for lv in m.blocks[0].levels if isinstance(lv, ContextLevel))
        outs.append(level(z))
        raw = to_rows(level.w_target(z), level.H)
        torch.testing.assert_close(seen[-1][1], l2norm(raw) if on else raw, rtol=0, atol=0)
    torch.testing.assert_close(seen[0][0], seen[1][0], rtol=0, atol=0)      # same keys, same weights
    assert not torch.allclose(outs[0], outs[1])


def test_matched_targets_keep_the_read_norm_at_the_key():
    """proj_target_match: each projection memory's self-generated target points where M_ref(vbar) points,
    with the norm of the memory's read at the write key, |M_ref(k)|; so a plain delta step (eta = 1, no
    momentum, no decay) sets the read at k to a vector no longer than before. +static_k turns it on."""
    from kernels.memory import memory_read
    layer = layer_for(projection_memories=["v", "eta", "alpha"], proj_target_match=True)
    spec = layer.proj_spec
    B = 2
    x = torch.randn(B, 6, 16, dtype=DT)
    u = layer.inputs(x)
    v = torch.randn_like(u) * 3
    for m in layer.proj_memories:
        state = tuple(w * 4 for w in layer.proj_init[m].expand(B))      # a grown memory
        got = layer.target(spec, state, v, u)
        plain = memory_read(spec, state, l2norm(v))
        at_k = memory_read(spec, state, u)
        n = plain.norm(dim=-1)
        torch.testing.assert_close(got.norm(dim=-1), at_k.norm(dim=-1) * n / (n + smt_module.MATCH_EPS),
                                   rtol=1e-12, atol=1e-14)
        torch.testing.assert_close((got * plain).sum(-1), got.norm(dim=-1) * n, rtol=1e-12, atol=1e-14)  # same way
        W = state[0]                                                     # linear: read = k W^T
        step = W - (W @ u[:, :1].transpose(1, 2) - got[:, :1].transpose(1, 2)) @ u[:, :1]
        assert ((u[:, :1] @ step.transpose(1, 2)).norm(dim=-1) <= at_k[:, :1].norm(dim=-1) * (1 + 1e-9)).all()
    assert layer.target(spec, state, v) is not None and not ModelConfig().proj_target_match
    assert preset_model_dict("hope-tiny+static_k")["proj_target_match"] is True
    assert "proj_target_match" not in preset_model_dict("hope-tiny+static_v")
