"""A non-finite step in a data-parallel run names where it came from (docs/MODEL.md, "Stability"):
every rank re-runs its own micro-batch forward, the ranks exchange their lines, and every rank holds
the same diagnosis naming the rank whose batch shows it."""
import re

import pytest

from diag_workers import diagnose_probe
from harness import run_distributed
from workers import tiny_tree


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 2])
def test_data_parallel_diagnosis_names_the_rank_and_the_memory(zero):
    tree = tiny_tree("titans", zero=zero, steps=1, threads=1)
    finite, overflow = zip(*run_distributed(diagnose_probe, 2, tree, 1))
    assert finite[0] == finite[1]                      # finite weights: the forward is finite everywhere
    assert re.fullmatch(r"forward finite \(loss [0-9.]+\); gradients are not re-checked in a data-parallel run "
                        r"\(a finite loss with a non-finite gradient: resume the checkpoint in one process to "
                        r"locate it\)", finite[0]), finite[0]
    assert overflow[0] == overflow[1]
    assert overflow[0].startswith("first non-finite value: blocks.1.mixer main memory state norm; "), overflow[0]
    assert overflow[0].endswith(" (data-parallel rank 1's micro-batch)"), overflow[0]
