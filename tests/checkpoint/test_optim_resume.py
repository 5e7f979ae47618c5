"""Checkpoints of the matrix optimizers (issue 14), one process: bitwise resume for each optimizer,
records carrying each rule's state, and resuming under another optimizer (refused unless asked)."""
from pathlib import Path

import pytest
import torch

from nl_pretrain.config import build_config
from nl_pretrain.optim.rules import STATE_KEYS
from nl_pretrain.train.loop import train
from workers import HOPE_CMS, tiny_tree

N = 6


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def single(run_dir, name, steps=N, **extra):
    tree = tiny_tree("hope", steps=steps, cms=extra.pop("cms", None))          # has a period-2 slow CMS level
    tree["optim"] = {**tree["optim"], "name": name, **extra.pop("optim", {})}
    tree["train"] = {**tree["train"], "run_dir": str(run_dir), "log_every": 1, "eval_every": 10 ** 6,
                     "threads": 1, **extra.pop("train", {})}
    tree["checkpoint"] = {"keep_last": 0, **extra.pop("checkpoint", {})}
    return build_config(tree)


@pytest.mark.parametrize("name", ["muon", "m3", "delta_momentum", "dmgd"])
def test_exact_resume_for_each_optimizer(tmp_path, name):
    a = train(single(tmp_path / "a", name, optim={"m3": {"frequency": 2}}, checkpoint={"every": 3}))
    b = train(single(tmp_path / "b", name, optim={"m3": {"frequency": 2}},
                     train={"resume": str(ckpt(tmp_path / "a", 3))}))
    assert b["losses"] == a["losses"][3:]
    ra = torch.load(ckpt(tmp_path / "a", N) / "shard-tp000-pp000-dp00000.pt", weights_only=False)["records"]
    rb = torch.load(ckpt(tmp_path / "b", N) / "shard-tp000-pp000-dp00000.pt", weights_only=False)["records"]
    keys = {k for rec in ra.values() for k in rec}
    assert set(STATE_KEYS[name]) | {"value", "exp_avg", "exp_avg_sq", "acc"} >= keys >= set(STATE_KEYS[name])
    for n in ra:
        assert ra[n].keys() == rb[n].keys()
        for k in ra[n]:
            assert torch.equal(ra[n][k], rb[n][k]), f"{n}.{k}"


def test_resume_with_another_optimizer_is_refused_unless_asked(tmp_path, capsys):
    train(single(tmp_path / "a", "adamw", steps=2))
    with pytest.raises(ValueError) as e:
        train(single(tmp_path / "b", "muon", steps=3, train={"resume": str(ckpt(tmp_path / "a", 2))}))
    assert str(e.value) == ("the checkpoint was trained with optim.name=adamw, this run asks for optim.name=muon: "
                            "resume with --optim.name=adamw, or pass --optim.allow_switch=true to continue the "
                            "weights with fresh muon state")
    out = train(single(tmp_path / "c", "muon", steps=3, optim={"allow_switch": True},
                       train={"resume": str(ckpt(tmp_path / "a", 2))}))
    said = capsys.readouterr().out
    assert "resume: optimizer switched from adamw (checkpoint) to muon: weights kept, optimizer moments and " \
           "step counts start fresh" in said
    assert len(out["losses"]) == 1
    rec = torch.load(ckpt(tmp_path / "c", 3) / "shard-tp000-pp000-dp00000.pt", weights_only=False)["records"]
    assert "momentum" in rec["blocks.0.mixer.w_q.weight"] and "exp_avg" in rec["embed.weight"]
    common = torch.load(ckpt(tmp_path / "c", 3) / "common.pt", weights_only=False)
    assert common["counters"]["optimizer"] == "muon" and common["counters"]["adam_steps"] == 1


def test_resume_with_other_level_optimizers_is_refused(tmp_path):
    levels = [HOPE_CMS[0], {**HOPE_CMS[1], "optimizer": "muon"}, HOPE_CMS[2]]
    train(single(tmp_path / "a", "adamw", steps=2, cms=levels))
    common = torch.load(ckpt(tmp_path / "a", 2) / "common.pt", weights_only=False)
    assert common["counters"]["level_optimizers"] == {"1": "muon"}
    with pytest.raises(ValueError) as e:
        train(single(tmp_path / "b", "adamw", steps=3, cms=HOPE_CMS, train={"resume": str(ckpt(tmp_path / "a", 2))}))
    assert str(e.value) == ("the checkpoint's CMS step levels were trained with model.cms[1].optimizer=muon, this "
                            "run asks for no level optimizers: resume with the checkpoint's level optimizers, or "
                            "pass --optim.allow_switch=true to continue the weights with fresh optimizer state")


# ------------------------------------------------------------------------------------ distributed
# ZeRO-3 with matrix state partitioned over the two DP ranks, and CMS levels with optimizers of their own
LEVEL_RULES = [HOPE_CMS[0], {**HOPE_CMS[1], "optimizer": "m3"}, {**HOPE_CMS[2], "optimizer": "dmgd"}]
DIST = {"dp2-zero3-muon-hope-level-rules": (tiny_tree("hope", zero=3, steps=N, cms=LEVEL_RULES), "muon", 2),
        "tp2-dmgd-hope": (tiny_tree("hope", tp=2, steps=N), "dmgd", 1)}


def _dist_tree(name, run_dir, **train_extra):
    from resume_workers import with_checkpoints
    tree, optim, _ = DIST[name]
    tree = {**tree, "optim": {**tree["optim"], "name": optim}}
    return with_checkpoints(tree, str(run_dir), every=N // 2, **({"train": train_extra} if train_extra else {}))


def test_distributed_exact_resume_and_resume_on_one_process(tmp_path):
    from harness import run_distributed
    from resume_workers import train_runs
    names = list(DIST)
    straight = run_distributed(train_runs, 2, [_dist_tree(n, tmp_path / "a" / n) for n in names], timeout=900)
    resumed = run_distributed(train_runs, 2, [_dist_tree(n, tmp_path / "b" / n,
                                                         resume=str(ckpt(tmp_path / "a" / n, N // 2)))
                                              for n in names], timeout=900)
    for i, n in enumerate(names):
        full = straight[0][i]["losses"]
        for rank in resumed:
            assert rank[i]["losses"] == full[N // 2:], f"{n}: resumed losses differ (bitwise)"
        # another layout: one process continues from the distributed checkpoint
        tree, optim, dp = DIST[n]
        cfg = single(tmp_path / "c" / n, optim, cms=tree["model"]["cms"],
                     train={"resume": str(ckpt(tmp_path / "a" / n, N // 2)),
                            "micro_batch_size": tree["train"]["micro_batch_size"] * dp})
        one = train(cfg)
        torch.testing.assert_close(torch.tensor(one["losses"]), torch.tensor(full[N // 2:]), rtol=1e-4, atol=1e-4)
