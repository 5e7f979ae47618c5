"""Resume on another parallel layout from any layout, the data position included (docs/CHECKPOINT.md).

Every layout below trains on the same global batches (global micro-batch of 2 sequences, 2
micro-steps per optimizer step), so an uninterrupted run's losses are the reference for a run that
resumes its mid-way checkpoint under another layout. A wrong weight, moment, counter, slow-level
accumulator or data position changes the resumed losses by far more than the tolerance.
Real processes over gloo (tests/parallel/harness.py); one set of 2 processes runs all 2-rank
layouts in turn, 4 processes resume the one-process checkpoint under TP2 x DP2.
"""
from pathlib import Path

import pytest
import torch

from harness import run_distributed
from nl_pretrain.config import build_config
from nl_pretrain.train.loop import train
from resume_workers import train_runs, with_checkpoints
from workers import tiny_tree

N = 4            # steps; the checkpoint is at N/2 = 2
TOL = dict(rtol=1e-5, atol=1e-5)
LAYOUTS = {      # sequences per micro-step and rank x data parallel = 2; grad_accum 2 everywhere
    "one": tiny_tree("hope", micro=2, accum=2, steps=N),
    "tp2": tiny_tree("hope", tp=2, micro=2, accum=2, steps=N),
    "pp2": tiny_tree("hope", pp=2, micro=2, accum=2, steps=N),
    "dp2-zero2": tiny_tree("hope", zero=2, micro=1, accum=2, steps=N),
    "dp2-zero3": tiny_tree("hope", zero=3, micro=1, accum=2, steps=N),
    "tp2xdp2": tiny_tree("hope", tp=2, zero=1, micro=1, accum=2, steps=N),
}
MOVES = [("tp2", "pp2"), ("dp2-zero2", "tp2"), ("pp2", "dp2-zero3")]      # 2 processes; then one -> tp2xdp2


def ckpt(run_dir: Path, step: int) -> str:
    return str(run_dir / "checkpoints" / f"step-{step:08d}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("any_layout")
    sources = sorted({a for a, _ in MOVES})
    straight = [with_checkpoints(LAYOUTS[s], str(root / s), every=N // 2) for s in sources]
    # ZeRO-3 patches torch's linear layers process-wide: its run goes last
    resumed = [with_checkpoints(LAYOUTS[b], str(root / f"{a}-to-{b}"), train={"resume": ckpt(root / a, N // 2)})
               for a, b in MOVES]
    out = run_distributed(train_runs, 2, straight + resumed, timeout=900)
    summaries = {s: out[0][i] for i, s in enumerate(sources)}
    for j, move in enumerate(MOVES):
        summaries[move] = [r[len(sources) + j] for r in out]
    one = with_checkpoints(LAYOUTS["one"], str(root / "one"), every=N // 2)
    one["train"]["eval_every"] = 10 ** 6
    summaries["one"] = train(build_config(one))
    four = run_distributed(train_runs, 4, [with_checkpoints(LAYOUTS["tp2xdp2"], str(root / "one-to-tp2xdp2"),
                                                            train={"resume": ckpt(root / "one", N // 2)})],
                           timeout=900)
    summaries[("one", "tp2xdp2")] = [r[0] for r in four]
    return summaries


@pytest.mark.slow
@pytest.mark.parametrize("move", MOVES + [("one", "tp2xdp2")], ids=lambda m: f"{m[0]}-to-{m[1]}")
def test_resume_on_another_layout_continues_the_curve(runs, move):
    source, _ = move
    full = runs[source]["losses"]
    assert len(full) == N
    for resumed in runs[move]:                      # every rank's summary
        assert len(resumed["losses"]) == N // 2
        torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(full[N // 2:]), **TOL)
