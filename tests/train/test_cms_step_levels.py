"""CMS step levels: updated exactly every k optimizer steps with the summed gradient (Eq. 71)."""
import copy

import pytest
import torch

from nl_pretrain.config import CMSLevel, OptimConfig, build_config
from nl_pretrain.model import LanguageModel
from nl_pretrain.optim import ModelOptimizer
from nl_pretrain.optim.optimizer import auto_phases


def make(levels, phase=-1):
    cfg = build_config({"model": {"preset": "transformer-tiny", "d_model": 16, "n_heads": 2, "n_layers": 1,
                                  "vocab_size": 32, "cms": levels}, "data": {"seq_len": 8}})
    torch.manual_seed(0)
    return cfg, LanguageModel(cfg.model)


def test_slow_level_updates_every_k_steps_with_summed_gradient():
    k = 3
    cfg, model = make([{"kind": "step", "period": 1, "expansion": 1.0},
                       {"kind": "step", "period": k, "expansion": 1.0, "lr_scale": 0.5}])
    ocfg = OptimConfig(lr=1e-2, weight_decay=0.0, grad_clip=0.0, warmup_steps=0)
    opt = ModelOptimizer(model, ocfg, cfg.model.cms)
    slow = model.blocks[0].levels[1].mlp.w_up.weight
    fast = model.blocks[0].levels[0].mlp.w_up.weight
    # the reference: an AdamW that sees the sum of k gradients once
    shadow = torch.nn.Parameter(slow.detach().clone())
    ref = torch.optim.AdamW([shadow], lr=1e-2 * 0.5, betas=(ocfg.beta1, ocfg.beta2), eps=ocfg.eps, weight_decay=0.0)
    acc = torch.zeros_like(slow)
    for step in range(2 * k + 1):
        before_slow, before_fast = slow.detach().clone(), fast.detach().clone()
        ids = torch.randint(0, 32, (2, 8))
        model.loss(ids, ids.roll(-1, 1)).backward()
        acc += slow.grad
        opt.step(step, 1e-2)
        opt.zero_grad()
        assert not torch.equal(fast, before_fast), "a period-1 level must change every step"
        if step % k == k - 1:
            shadow.grad = acc.clone()
            ref.step()
            acc.zero_()
            assert not torch.equal(slow, before_slow)
            torch.testing.assert_close(slow.detach(), shadow.detach(), rtol=0, atol=1e-7)
        else:
            assert torch.equal(slow, before_slow), f"period-{k} level changed at step {step}"


def test_phases_are_staggered_and_saved():
    assert auto_phases([1, 4, 4]) == [0, 0, 2]
    cfg, model = make([{"kind": "step", "period": 4, "expansion": 1.0},
                       {"kind": "step", "period": 4, "expansion": 1.0}])
    opt = ModelOptimizer(model, OptimConfig(), cfg.model.cms)
    due = [[opt.updates_at(i, s) for s in range(8)] for i in range(2)]
    assert due[0] == [False, False, False, True] * 2
    assert due[1] == [False, True, False, False] * 2
    ids = torch.randint(0, 32, (2, 8))
    model.loss(ids, ids).backward()
    opt.step(0, 1e-3)
    state = opt.state_dict()
    assert state["phases"] == [0, 2] and state["periods"] == [4, 4]
    assert any(a.abs().sum() > 0 for a in state["slow"][0]["acc"]), "accumulated gradient must be in the state"
    opt2 = ModelOptimizer(copy.deepcopy(model), OptimConfig(), cfg.model.cms)
    opt2.load_state_dict(state)
    for a, b in zip(opt2.slow[0]["acc"], opt.slow[0]["acc"]):
        assert torch.equal(a, b)


def test_state_from_other_schedule_is_rejected():
    cfg, model = make([{"kind": "step", "period": 4, "expansion": 1.0}])
    cfg2, model2 = make([{"kind": "step", "period": 2, "expansion": 1.0}])
    state = ModelOptimizer(model, OptimConfig(), cfg.model.cms).state_dict()
    with pytest.raises(ValueError, match="periods/phases"):
        ModelOptimizer(model2, OptimConfig(), cfg2.model.cms).load_state_dict(state)


def test_explicit_phase_must_be_below_period():
    from nl_pretrain.config import ConfigError
    with pytest.raises(ConfigError, match=r"cms\[0\].phase \(4\) must be < period \(4\)"):
        make([{"kind": "step", "period": 4, "phase": 4}])
    assert CMSLevel().period == 1
