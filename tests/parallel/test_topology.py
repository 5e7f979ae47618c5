"""Layout checks and the dry run: refusals name the numbers and the fix; nothing is trained."""
import pytest

from nl_pretrain.cli import main
from nl_pretrain.config import build_config
from nl_pretrain.parallel.dryrun import stage_parameters
from nl_pretrain.parallel.topology import Layout, LayoutError, check_layout


def cfg(**parallel):
    tree = {"model": {"preset": "hope-tiny"}, "train": {"micro_batch_size": 2, "grad_accum": 2},
            "parallel": {"tensor": 1, "pipeline": 1, "zero_stage": 0, **parallel}}
    return build_config(tree)


def test_valid_layout_and_rank_order():
    layout = check_layout(cfg(tensor=2, pipeline=2, zero_stage=1), 8, global_batch=8)
    assert (layout.tp, layout.pp, layout.dp, layout.global_batch) == (2, 2, 2, 8)
    # megatron-core order tp-dp-pp (= DeepSpeed's model, data, pipe)
    assert [layout.coords(r) for r in range(8)] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0),
                                                   (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]


@pytest.mark.parametrize("parallel, world, batch, message", [
    (dict(tensor=3), 3, None, "model.n_heads (4) must divide by parallel.tensor (3)"),
    (dict(tensor=2), 3, None, "world size (3) must divide by parallel.tensor (2) x parallel.pipeline (1) = 2"),
    (dict(pipeline=3), 3, None, "model.n_layers (2) must divide by parallel.pipeline (3)"),
    (dict(pipeline=2, zero_stage=2), 2, None, "use --parallel.zero_stage=1"),
    (dict(), 2, 6, "global batch (6) must divide by train.micro_batch_size (2) x data parallel (2) = 4"),
    (dict(), 2, 16, "set --train.grad_accum=4"),
])
def test_refusals_name_numbers_and_fix(parallel, world, batch, message):
    with pytest.raises(LayoutError) as err:
        check_layout(cfg(**parallel), world, batch)
    assert message in str(err.value)


def test_vocabulary_must_divide_by_tensor():
    c = build_config({"model": {"preset": "hope-tiny", "vocab_size": 4097}, "parallel": {"tensor": 2}})
    with pytest.raises(LayoutError, match=r"pad it with --model.vocab_size=4098"):
        check_layout(c, 2)


def test_stage_parameters_split_the_model():
    c = cfg(tensor=2, pipeline=2, zero_stage=1)
    one = stage_parameters(cfg(), Layout(1, 1, 1, 0, 2, 2))[0]
    split = stage_parameters(c, Layout(2, 2, 1, 1, 2, 2))
    assert one / 2 < split[0] + split[1] < one        # replicated norms counted once per rank, embedding tied


def test_dry_run_prints_each_rank(capsys):
    rc = main(["train", "--dry-run", "--world-size", "8", "--model.preset=hope-tiny", "--parallel.tensor=2",
               "--parallel.pipeline=2", "--parallel.zero_stage=1", "--train.grad_accum=2"])
    out = capsys.readouterr().out
    assert rc == 0 and "nothing was trained" in out
    assert "world 8 = tensor 2 x pipeline 2 x data 2" in out
    rows = [line for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert len(rows) == 8 and rows[5].split()[4] == "1-1" and rows[5].split()[5] == "2-3"


def test_dry_run_refuses_bad_layout(capsys):
    assert main(["train", "--dry-run", "--world-size", "3", "--parallel.tensor=2"]) == 2
    assert "world size (3)" in capsys.readouterr().err
