"""Sharded checkpoints of real training runs: exact resume, resume under another layout, export,
non-finite steps (skip / rollback), ``--resume auto`` past a corrupt checkpoint.

Distributed runs are real gloo processes (tests/parallel/harness.py); each spawn runs several
layouts in turn (imports cost ~15 s per process on 2 cores).
"""
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from harness import run_distributed
from nl_pretrain.config import build_config
from nl_pretrain.train.loop import train
from resume_workers import failure_runs, train_runs, with_checkpoints
from workers import reference_run, tiny_tree

N = 6            # steps; the checkpoint is at N/2 = 3, which the period-2 CMS level does not divide
LAYOUTS = {      # name: (tree, data-parallel size)
    "dp2-zero2-hope": (tiny_tree("hope", zero=2, steps=N), 2),
    "tp2-hope": (tiny_tree("hope", tp=2, steps=N), 1),
    "pp2-zero1-hope-accum2": (tiny_tree("hope", pp=2, zero=1, accum=2, steps=N), 1),
    "dp2-zero3-hope": (tiny_tree("hope", zero=3, steps=N), 2),
}
BF16 = {"dp2-zero0-hope-bf16": (tiny_tree("hope", steps=N, precision="bf16"), 2)}   # DeepSpeed's bf16 masters
EXACT = ("dp2-zero2-hope", "tp2-hope", "dp2-zero0-hope-bf16")


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """N steps straight under each layout, saving every N/2 steps (the save must not perturb the run)."""
    root = tmp_path_factory.mktemp("straight")
    # the layouts resumed below run first, in the same order as there: a ZeRO-3 engine patches torch's
    # linear layers process-wide, which changes later bf16 rounding in the same process
    layouts = {**LAYOUTS, **BF16}
    order = list(EXACT) + [n for n in layouts if n not in EXACT]
    trees = {n: with_checkpoints(layouts[n][0], str(root / n), every=N // 2) for n in order}
    results = run_distributed(train_runs, 2, list(trees.values()), timeout=900)
    return {n: (Path(trees[n]["train"]["run_dir"]), results[0][i]) for i, n in enumerate(trees)}


@pytest.fixture(scope="module")
def resumed(straight, tmp_path_factory):
    """Fresh processes, same layout: load the N/2 checkpoint, N/2 more steps."""
    root = tmp_path_factory.mktemp("resumed")
    layouts = {**LAYOUTS, **BF16}
    trees = [with_checkpoints(layouts[n][0], str(root / n), train={"resume": str(ckpt(straight[n][0], N // 2))})
             for n in EXACT]
    results = run_distributed(train_runs, 2, trees, timeout=900)
    return {n: [r[i] for r in results] for i, n in enumerate(EXACT)}


@pytest.mark.parametrize("name", EXACT)
def test_exact_resume_same_layout_is_bitwise(straight, resumed, name):
    full = straight[name][1]["losses"]
    assert len(full) == N and all(math.isfinite(x) for x in full)
    for rank_summary in resumed[name]:
        assert rank_summary["losses"] == full[N // 2:], "resumed losses differ from the straight run (bitwise)"


def _single_process(tree: dict, dp: int, run_dir: Path, resume: str) -> dict:
    t = dict(tree)
    t["train"] = {**tree["train"], "micro_batch_size": tree["train"]["micro_batch_size"] * dp,
                  "run_dir": str(run_dir), "resume": resume, "log_every": 1, "eval_every": 10 ** 6}
    t["parallel"] = {"tensor": 1, "pipeline": 1, "zero_stage": 0}
    t["checkpoint"] = {"keep_last": 0}
    return train(build_config(t))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_resume_on_one_process_continues_the_curve(straight, name, tmp_path, capsys):
    """DP 2 -> 1, TP 2 -> 1, PP 2 -> 1, ZeRO 3 -> 1: same losses within float tolerance, the data
    position carried over (a wrong position would change the losses by far more)."""
    tree, dp = LAYOUTS[name]
    run_dir, summary = straight[name]
    out = _single_process(tree, dp, tmp_path / "one", str(ckpt(run_dir, N // 2)))
    assert "saved under" in capsys.readouterr().out                 # it noticed the layout change
    torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(summary["losses"][N // 2:]),
                               rtol=1e-5, atol=1e-5)


def test_checkpoint_contents(straight):
    """Every rank wrote its part; records are dealt over DP ranks; TP pieces carry their plan."""
    idx = json.loads((ckpt(straight["dp2-zero2-hope"][0], N)/ "index.json").read_text())
    names = set(idx["files"])
    assert {"shard-tp000-pp000-dp00000.pt", "shard-tp000-pp000-dp00001.pt", "local-00000.pt", "local-00001.pt",
            "common.pt"} <= names
    assert idx["meta"]["layout"] == {"tp": 1, "pp": 1, "dp": 2, "zero_stage": 2} and idx["world"] == 2
    d0 = torch.load(ckpt(straight["dp2-zero2-hope"][0], N) / "shard-tp000-pp000-dp00000.pt", weights_only=False)
    d1 = torch.load(ckpt(straight["dp2-zero2-hope"][0], N) / "shard-tp000-pp000-dp00001.pt", weights_only=False)
    assert d0["records"] and d1["records"] and not set(d0["records"]) & set(d1["records"])
    tp1 = torch.load(ckpt(straight["tp2-hope"][0], N) / "shard-tp001-pp000-dp00000.pt", weights_only=False)
    assert tp1["tp_size"] == 2 and tp1["plan"]["embed.weight"] == ["vocab", 0]
    assert "norm.weight" not in tp1["records"]          # replicated tensors are saved by tensor rank 0 only
    common = torch.load(ckpt(straight["dp2-zero2-hope"][0], N) / "common.pt", weights_only=False)
    assert common["data"]["samples_consumed"] == N * 2 * 2       # global samples: N steps x micro 2 x DP 2
    assert common["counters"]["adam_steps"] == N and common["counters"]["slow_updates"] == {2: N // 2}


def test_export_from_a_tensor_parallel_checkpoint(straight, tmp_path):
    from nl_pretrain.checkpoint.export import export_checkpoint, load_exported
    info = export_checkpoint(str(straight["tp2-hope"][0] / "checkpoints"), str(tmp_path / "exp"))
    assert info["step"] == N
    mode = (tmp_path / "exp" / "model.safetensors").stat().st_mode & 0o777
    assert mode == (tmp_path / "exp" / "config.yaml").stat().st_mode & 0o777, oct(mode)   # not owner-only
    model, cfg = load_exported(str(tmp_path / "exp"))
    tree, dp = LAYOUTS["tp2-hope"]
    _, ref = reference_run(tree, tree["train"]["micro_batch_size"] * dp)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref[name], rtol=1e-3, atol=5e-4, msg=lambda m: f"{name}: {m}")
    ids = torch.randint(0, cfg.model.vocab_size, (1, 16))
    assert torch.isfinite(model(ids)).all()


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    skip_trees = [with_checkpoints(tiny_tree("hope", zero=2, steps=N), str(root / "skip-dp2")),
                  with_checkpoints(tiny_tree("hope", pp=2, zero=1, accum=2, steps=N), str(root / "skip-pp2"))]
    rollback = with_checkpoints(tiny_tree("hope", zero=1, steps=N), str(root / "rollback"), every=2,
                                train={"on_nan": "rollback"})
    return run_distributed(failure_runs, 2, skip_trees, rollback, 3, timeout=900)


def test_nonfinite_step_is_skipped_exactly(failures):
    for rank in failures:
        for probe in rank["skip"]:
            assert probe["finite"] == [True, True, True, False, True]
            assert not math.isfinite(probe["losses"][3]) and math.isfinite(probe["losses"][4])
            assert probe["unchanged"] and probe["records"] > 0, "a skipped step changed weights or moments"
            assert probe["counters"][0] == probe["counters"][1]
            assert probe["acc_unchanged"] and probe["n_acc"] > 0


def test_nonfinite_step_rolls_back_to_the_last_checkpoint(failures):
    for rank in failures:
        s = rank["rollback"]
        assert s["nan_events"] == [{"step": 3, "event": "rollback", "to_step": 2}]
        assert len(s["losses"]) == N + 1 and all(math.isfinite(x) for x in s["losses"])


# ------------------------------------------------------------------------------------ one process
def _tiny_single(tmp_path, steps=N, **train_extra):
    tree = tiny_tree("hope", steps=steps)
    tree["train"] = {**tree["train"], "run_dir": str(tmp_path), "log_every": 1, "eval_every": 10 ** 6,
                     **train_extra.pop("train", {})}
    tree["checkpoint"] = {"keep_last": 0, **train_extra.pop("checkpoint", {})}
    return build_config(tree)


def test_single_process_exact_resume_and_async_save(tmp_path):
    a = train(_tiny_single(tmp_path / "a", checkpoint={"every": 3}))
    b = train(_tiny_single(tmp_path / "b", train={"resume": str(ckpt(tmp_path / "a", 3))},
                           checkpoint={"async_save": True}))
    assert b["losses"] == a["losses"][3:]
    ra = torch.load(ckpt(tmp_path / "a", N) / "shard-tp000-pp000-dp00000.pt", weights_only=False)["records"]
    rb = torch.load(ckpt(tmp_path / "b", N) / "shard-tp000-pp000-dp00000.pt", weights_only=False)["records"]
    assert ra.keys() == rb.keys()
    for n in ra:                                      # the async save wrote the same bytes' worth
        for k in ra[n]:
            assert torch.equal(ra[n][k], rb[n][k]), f"{n}.{k}"


def test_async_save_is_unaffected_by_training_after_it_returns(tmp_path):
    """The async save writes the records without a second host copy: they must be private copies,
    so changing every weight, moment and CMS accumulator in place right after save() returns must
    not reach the file."""
    from nl_pretrain.checkpoint.manager import Checkpointer
    from nl_pretrain.checkpoint.state import LocalAccess
    from nl_pretrain.model import LanguageModel
    from nl_pretrain.optim import ModelOptimizer
    cfg = _tiny_single(tmp_path, checkpoint={"async_save": True, "dir": str(tmp_path / "ck")})
    model = LanguageModel(cfg.model)
    opt = ModelOptimizer(model, cfg.optim, cfg.model.cms)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 17))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    opt.step(0, cfg.optim.lr)                               # moments exist; the slow level holds a sum
    access = LocalAccess(model, opt)
    before = {n: access.read(n, p) for n, p in access.named}
    assert any("acc" in r and r["acc"].abs().sum() > 0 for r in before.values())
    coords = {"rank": 0, "world": 1, "tp": 0, "tp_size": 1, "pp": 0, "dp": 0, "dp_size": 1}
    ck = Checkpointer(cfg, access, coords, plan={})
    ck.save(1, 0, {"samples_consumed": 2})
    with torch.no_grad():                                   # training goes on at once, in place
        for o in [opt.base] + [lv["opt"] for lv in opt.slow.values()]:
            for st in o.state.values():
                for k in ("exp_avg", "exp_avg_sq"):
                    st[k].add_(1.0)
        for lv in opt.slow.values():
            for a in lv["acc"]:
                a.add_(1.0)
        for p in model.parameters():
            p.add_(1.0)
    ck.wait()
    saved = torch.load(tmp_path / "ck" / "step-00000001" / "shard-tp000-pp000-dp00000.pt", weights_only=False)["records"]
    assert saved.keys() == before.keys()
    for n, rec in before.items():
        for k, v in rec.items():
            assert torch.equal(saved[n][k], v), f"{n}.{k} changed after save() returned"


def test_single_process_skip_and_rollback(tmp_path, monkeypatch):
    monkeypatch.setenv("NL_PRETRAIN_FAULT_NAN_STEPS", "2")
    s = train(_tiny_single(tmp_path / "skip"))
    assert s["nan_events"] == [{"step": 2, "event": "skip"}] and len(s["losses"]) == N - 1
    common = torch.load(ckpt(tmp_path / "skip", N) / "common.pt", weights_only=False)
    assert common["counters"]["adam_steps"] == N - 1            # the skipped step applied nothing
    monkeypatch.setenv("NL_PRETRAIN_FAULT_NAN_STEPS", "3")
    r = train(_tiny_single(tmp_path / "rb", train={"on_nan": "rollback"}, checkpoint={"every": 2}))
    assert r["nan_events"] == [{"step": 3, "event": "rollback", "to_step": 2}]
    common = torch.load(ckpt(tmp_path / "rb", N) / "common.pt", weights_only=False)
    # 2 steps before the checkpoint, then steps 2..5 again from it: the rolled-back step 2 never counts
    assert common["counters"]["adam_steps"] == N and all(math.isfinite(x) for x in r["losses"])
    monkeypatch.setenv("NL_PRETRAIN_FAULT_NAN_STEPS", "1")
    with pytest.raises(FloatingPointError, match="train.on_nan=stop"):
        train(_tiny_single(tmp_path / "stop", train={"on_nan": "stop"}))


def test_resume_auto_skips_a_corrupt_checkpoint(tmp_path, capsys):
    train(_tiny_single(tmp_path, steps=4, checkpoint={"every": 2}))
    shard = ckpt(tmp_path, 4) / "shard-tp000-pp000-dp00000.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF                                      # one flipped byte
    shard.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = train(_tiny_single(tmp_path, steps=5, train={"resume": "auto"}))
    said = capsys.readouterr()
    assert any("step-00000004" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert f"resumed from {ckpt(tmp_path, 2)} at step 2" in said.out
    assert len(out["losses"]) == 3


def test_resume_refuses_another_model(tmp_path):
    from nl_pretrain.config import ConfigError
    train(_tiny_single(tmp_path / "a", steps=2))
    cfg = _tiny_single(tmp_path / "b", steps=3, train={"resume": str(ckpt(tmp_path / "a", 2))})
    cfg.model.d_model = 48
    with pytest.raises(ConfigError, match=r"model\.d_model: 32 in the checkpoint, 48 now"):
        train(cfg)


def test_distributed_run_refuses_a_run_dir_in_use_on_every_rank(tmp_path):
    from nl_pretrain.train.rundir import RunDirLock
    from resume_workers import busy_run
    tree = with_checkpoints(tiny_tree("hope", zero=1, steps=2), str(tmp_path / "run"))
    with RunDirLock([tmp_path / "run"]):
        said = run_distributed(busy_run, 2, tree, timeout=300)
    assert said[0] and f"{tmp_path / 'run'} is in use by another training run (pid " in said[0]
    assert said[1] == said[0] + " (reported by rank 0)"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]      # nothing written


def test_rollback_without_checkpoints_is_refused_before_work(tmp_path):
    from nl_pretrain.config import ConfigError
    with pytest.raises(ConfigError, match="--checkpoint.every"):
        train(_tiny_single(tmp_path, train={"on_nan": "rollback"}))
    assert not (tmp_path / "checkpoints").exists()


def test_resume_a_checkpoint_written_before_a_model_key_existed(tmp_path):
    """A checkpoint whose model config lacks a key added later (here context_target_norm, added off and
    later made the default) compares as the behaviour it was trained with: refused under today's
    default with the flag that resumes it, resumed with that flag."""
    import hashlib
    import json
    from nl_pretrain.config import ConfigError
    train(_tiny_single(tmp_path / "a", steps=2))
    path = ckpt(tmp_path / "a", 2)
    common = torch.load(path / "common.pt", weights_only=False)
    del common["model"]["context_target_norm"], common["model"]["proj_target_match"]
    torch.save(common, path / "common.pt")
    index = json.loads((path / "index.json").read_text())
    data = (path / "common.pt").read_bytes()
    entry = index["files"]["common.pt"]
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (path / "index.json").write_text(json.dumps(index))
    cfg = _tiny_single(tmp_path / "b", steps=3, train={"resume": str(path)})
    with pytest.raises(ConfigError, match=r"model\.context_target_norm: False in the checkpoint \(written before the "
                                          r"key existed\), True now; resume it with --model\.context_target_norm=false\. "):
        train(cfg)
    cfg = _tiny_single(tmp_path / "c", steps=3, train={"resume": str(path)})
    cfg.model.context_target_norm = False
    assert len(train(cfg)["losses"]) == 1
