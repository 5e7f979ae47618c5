"""Preset parameter counts land within 5% of their names (counted on the meta device)."""
import subprocess
import sys

import pytest

from nl_pretrain.cli import count_parameters
from nl_pretrain.config import build_config
from nl_pretrain.presets import SIZES, TARGET_PARAMS, preset_names


@pytest.mark.parametrize("name", [n for n in preset_names() if not n.endswith("-tiny")])
def test_count_within_five_percent(name):
    cfg = build_config({"model": {"preset": name}, "data": {"seq_len": 256}})
    total = sum(count_parameters(cfg.model).values())
    target = TARGET_PARAMS[name.rpartition("-")[2]]
    assert abs(total / target - 1) < 0.05, f"{name}: {total:,} vs {target:,.0f}"


def test_paper_dimensions():
    assert SIZES["340m"][:3] == (24, 1024, 16)
    assert SIZES["760m"][:3] == (24, 1536, 16)
    assert SIZES["1.3b"][:3] == (18, 2048, 8)


def test_info_command_prints_total():
    out = subprocess.run([sys.executable, "-m", "nl_pretrain.cli", "info", "--config", "configs/tiny_hope.yaml",
                          "--model.preset=hope-1.3b"], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[-1].startswith("parameters: ")
    total = int(lines[-1].split()[-1])
    assert abs(total / 1.3e9 - 1) < 0.05
    assert any("self-modifying titans" in ln for ln in lines) and any("context" in ln for ln in lines)


@pytest.mark.parametrize("name", [n for n in preset_names() if not n.endswith("-tiny")])
def test_step_level_widths_shard_evenly(name):
    cfg = build_config({"model": {"preset": name}, "data": {"seq_len": 256}})
    for lvl in cfg.model.cms:
        if lvl.kind == "step":
            assert round(lvl.expansion * cfg.model.d_model) % 128 == 0, name
