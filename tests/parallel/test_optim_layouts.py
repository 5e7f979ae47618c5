"""The matrix optimizers (issue 14) under parallel layouts against one process, real gloo processes:
tensor parallel (Newton-Schulz and DMGD on gathered whole matrices), ZeRO 1/2 (flat partitions
gathered to whole matrices, each rank updating its own), the pipeline, and the slow CMS levels."""
import pytest
import torch

from harness import run_distributed
from test_layouts import check_against_one_process
from workers import distributed_runs, tiny_tree


def with_optim(tree, name, **section):
    tree["optim"] = {**tree["optim"], "name": name, **section}
    return tree


LAYOUTS = {      # name: (tree, data-parallel size)
    "tp2-muon-hope-clipped": (with_optim(tiny_tree("hope", tp=2, clip=0.05, steps=4), "muon"), 1),
    "dp2-zero1-m3-hope": (with_optim(tiny_tree("hope", zero=1, steps=4), "m3", m3={"frequency": 2}), 2),
    "dp2-zero2-dmgd-transformer-accum2": (with_optim(tiny_tree("transformer", zero=2, accum=2), "dmgd"), 2),
    "pp2-zero1-delta_momentum-hope-accum2": (with_optim(tiny_tree("hope", pp=2, zero=1, accum=2, steps=4),
                                                        "delta_momentum"), 1),
    "tp2-dmgd-transformer": (with_optim(tiny_tree("transformer", tp=2), "dmgd"), 1),
}


@pytest.fixture(scope="module")
def runs():
    names = list(LAYOUTS)
    results = run_distributed(distributed_runs, 2, [LAYOUTS[n][0] for n in names], timeout=900)
    return {n: [r[i] for r in results] for i, n in enumerate(names)}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_matrix_optimizer_layout_matches_one_process(runs, name):
    tree, dp = LAYOUTS[name]
    check_against_one_process(tree, dp, runs[name])
