"""Shards built in place (nl_pretrain/parallel/materialize.py, nl_pretrain/model/init.py).

Every rank builds the model on the meta device and materialises only its share; each shard must be
bitwise the corresponding slice of the one-process model from the same seed, and nothing of another
pipeline stage may be allocated. Real processes over gloo (tests/parallel/harness.py).
"""
import pytest
import torch

from harness import run_distributed
from nl_pretrain.config import build_config
from nl_pretrain.model import LanguageModel
from workers import local_parameters, tiny_tree

LAYOUTS = {      # name: tree (2 processes)
    "tp2-hope": tiny_tree("hope", tp=2),
    "pp2-hope": tiny_tree("hope", pp=2, accum=2),
    "tp2-gated_deltanet": tiny_tree("gated_deltanet", tp=2),      # linear main memory, static projections
    "pp2-transformer-untied": {**tiny_tree("transformer", pp=2, accum=2),
                               "model": {**tiny_tree("transformer")["model"], "tie_embeddings": False}},
    "dp2-zero3-hope": tiny_tree("hope", zero=3),        # last: ZeRO-3 patches torch's linear layers process-wide
}


def built_shards(trees):
    """Per layout: this rank's parameters right after the trainer is built (before any step), the
    names left on the meta device, and how many parameters the rank materialised."""
    from megatron.core import parallel_state as ps
    from nl_pretrain.parallel.trainer import DistributedTrainer
    out = []
    for tree in trees:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        import deepspeed
        seen, start = {}, deepspeed.initialize

        def observed(*args, **kwargs):     # what the rank holds when the engine starts (then the real one)
            params = list(kwargs["model"].parameters())
            seen.update(local=sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
                        share=sum(getattr(p, "ds_numel", p.numel()) for p in params), tensors=len(params))
            return start(*args, **kwargs)
        deepspeed.initialize = observed
        try:
            trainer = DistributedTrainer(build_config(tree))
        finally:
            deepspeed.initialize = start
        held = local_parameters(trainer)                 # ZeRO-3: its partitions gathered
        meta = [n for n, p in trainer.model.named_parameters() if p.is_meta]
        real = sum(p.numel() for p in trainer.model.parameters() if not p.is_meta)
        out.append({"params": held, "meta": meta, "real": real, "tp": trainer.tp_rank, "pp": trainer.pp_rank,
                    "plan": trainer.plan, "at_engine_start": seen})
    return out


@pytest.fixture(scope="module")
def shards():
    results = run_distributed(built_shards, 2, list(LAYOUTS.values()), timeout=600)
    return {n: [r[i] for r in results] for i, n in enumerate(LAYOUTS)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_shard_is_the_slice_of_the_one_process_model(shards, name):
    cfg = build_config(LAYOUTS[name])
    torch.manual_seed(cfg.train.seed)
    full = dict(LanguageModel(cfg.model).named_parameters())
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    seen = set()
    for rank in shards[name]:
        for n, p in rank["params"].items():
            ref = full[n].detach()
            if n in rank["plan"]:
                _, dim = rank["plan"][n]
                size = ref.shape[dim] // tp
                ref = ref.narrow(dim, rank["tp"] * size, size)
            assert p.shape == ref.shape and torch.equal(p, ref), f"rank tp{rank['tp']} pp{rank['pp']}: {n} differs"
            seen.add(n)
    assert seen == set(full), f"no rank holds {sorted(set(full) - seen)}"
    if pp > 1:     # each stage materialised only its own blocks (the rest stayed on the meta device)
        for rank in shards[name]:
            mine = {n.split(".")[1] for n in rank["params"] if n.startswith("blocks.")}
            assert mine == {str(rank["pp"])}, mine
            assert set(rank["meta"]) == set(full) - set(rank["params"]), rank["meta"]
            assert rank["real"] < sum(p.numel() for p in full.values())
    if cfg.parallel.zero_stage == 3:     # partitioned as built: 1/DP of the share (+ padding) before the engine
        dp = len(shards[name]) // (tp * pp)
        for rank in shards[name]:
            seen = rank["at_engine_start"]
            assert seen["share"] / dp <= seen["local"] <= seen["share"] / dp + seen["tensors"], seen
    if tp > 1:
        total = sum(p.numel() for p in full.values())
        for rank in shards[name]:
            assert rank["real"] < 0.6 * total, (rank["real"], total)


def test_init_values_are_a_function_of_seed_and_name(monkeypatch):
    """The one-process values do not depend on what else the model holds, and the constant rules
    equal what the constructors set (nl_pretrain/model/init.py must follow the modules)."""
    import nl_pretrain.model.model as model_module
    from nl_pretrain.model.init import initial_value, is_random
    for family in ("hope", "hope_attention", "titans", "gated_deltanet", "transformer"):
        cfg = build_config(tiny_tree(family)).model
        a = LanguageModel(cfg, seed=7)
        with torch.device("meta"):
            m = LanguageModel(cfg, seed=7)
        assert all(p.is_meta for p in m.parameters())
        for n, p in a.named_parameters():
            assert torch.equal(p.detach(), initial_value(m, n, 7)), n
        wider = build_config({**tiny_tree(family), "model": {**tiny_tree(family)["model"], "n_layers": 4}}).model
        b = dict(LanguageModel(wider, seed=7).named_parameters())
        for n, p in a.named_parameters():       # more layers before/after change nothing but the output std
            if not n.endswith(("w_o.weight", "w_down.weight")):
                assert torch.equal(p, b[n]), n
        with monkeypatch.context() as mp:
            mp.setattr(model_module, "init_parameters", lambda model, seed: None)
            ctor = dict(LanguageModel(cfg, seed=7).named_parameters())
        constants = [n for n, _ in a.named_parameters() if not is_random(a, n)]
        assert constants
        for n in constants:
            assert torch.equal(ctor[n], dict(a.named_parameters())[n]), f"{n}: the rule differs from the constructor"
    c = LanguageModel(cfg, seed=8)
    assert not torch.equal(c.embed.weight, a.embed.weight)
