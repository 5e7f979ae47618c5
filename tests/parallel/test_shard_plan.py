"""The tensor-parallel plan comes from what each model module declares (``tp_plan``)."""
import pytest
import torch
import torch.nn as nn

from nl_pretrain.config import build_config
from nl_pretrain.model import LanguageModel
from nl_pretrain.parallel.tensor import shard_plan
from workers import tiny_tree


def _model(family="hope", **extra):
    cfg = build_config(tiny_tree(family))
    for k, v in extra.items():
        setattr(cfg.model, k, v)
    with torch.device("meta"):
        return LanguageModel(cfg.model)


def test_plan_follows_the_declarations():
    plan = shard_plan(_model(tie_embeddings=False))
    assert plan["embed.weight"] == ("vocab", 0) and plan["lm_head.weight"] == ("column", 0)
    mixer = "blocks.0.mixer."
    assert plan[mixer + "w_q.weight"] == ("column", 0) and plan[mixer + "w_o.weight"] == ("row", 1)
    assert plan[mixer + "proj_init.k.weights.0"] == ("heads", 0) and plan[mixer + "conv_q.weight"] == ("heads", 0)
    assert plan["blocks.0.levels.0.w_eta.bias"] == ("column", 0)          # a context level's gate bias
    assert plan["blocks.0.levels.1.mlp.w_down.weight"] == ("row", 1)       # a step level's SwiGLU
    assert "norm.weight" not in plan and "blocks.0.norm.weight" not in plan   # replicated


def test_a_parameter_no_plan_covers_is_an_error():
    model = _model("transformer")
    model.blocks[0].extra = nn.Linear(4, 4)                  # a child the block's walk reaches undeclared
    with pytest.raises(TypeError, match=r"Linear at 'blocks\.0\.extra\.' .* declares no tp_plan"):
        shard_plan(model)
    model = _model("transformer")
    model.blocks[0].mixer.gain = nn.Parameter(torch.ones(4))  # a parameter its module's plan does not name
    with pytest.raises(TypeError, match=r"Attention.tp_plan does not say how 'gain' splits"):
        shard_plan(model)


def test_local_head_counts_come_from_shapes():
    model = _model()
    mixer, level = model.blocks[0].mixer, model.blocks[0].levels[0]
    assert mixer.H == 2 and level.H == 2
    mixer.eta_bias = nn.Parameter(torch.zeros(1))           # what a TP2 rank keeps
    level.beta_logit = nn.Parameter(torch.zeros(1))
    assert mixer.H == 1 and level.H == 1
