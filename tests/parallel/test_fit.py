"""One loop for every layout: a distributed run (``fit`` over the DeepSpeed engine module) logs the
same metrics as a single-process run (``fit`` over the local module), and the values agree: loss,
lr, gradient norm (before clipping), held-out loss and perplexity on the same held-out batches."""
import json
import math

import pytest

from harness import run_distributed
from nl_pretrain.config import build_config
from nl_pretrain.train.loop import train
from workers import tiny_tree, train_runs

STEPS = 4


def _tree(run_dir, **layout):
    tree = tiny_tree("hope", steps=STEPS, clip=0.05, **layout)
    tree["data"] = {**tree["data"], "max_documents": 40, "val_fraction": 0.3}
    tree["train"] = {**tree["train"], "run_dir": str(run_dir), "log_every": 2, "eval_every": 2, "eval_batches": 2}
    tree["checkpoint"] = {"save_final": False}
    return tree


LAYOUTS = {"dp2-zero1": (dict(zero=1), 2), "pp2-zero1-accum2": (dict(pp=2, zero=1, accum=2), 1),
           "tp2": (dict(tp=2), 1)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    trees = {n: _tree(root / n, **kw) for n, (kw, _) in LAYOUTS.items()}
    run_distributed(train_runs, 2, list(trees.values()), timeout=900)
    return root, trees


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_distributed_metrics_match_one_process(runs, name, tmp_path):
    root, trees = runs
    tree, dp = trees[name], LAYOUTS[name][1]
    one = dict(tree, train={**tree["train"], "run_dir": str(tmp_path / "one"),
                            "micro_batch_size": tree["train"]["micro_batch_size"] * dp},
               parallel={"tensor": 1, "pipeline": 1, "zero_stage": 0})
    train(build_config(one))
    ref, got = _records(tmp_path / "one"), _records(root / name)
    assert [sorted(r) for r in got] == [sorted(r) for r in ref]          # the same keys, record by record
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_ppl"} <= {k for r in got for k in r}
    for a, b in zip(got, ref):
        assert a["step"] == b["step"]
        for k in ("loss", "lr", "grad_norm", "val_loss", "val_ppl", "val_tokens", "tokens"):
            if k in b:
                assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (name, a["step"], k, a[k], b[k])
