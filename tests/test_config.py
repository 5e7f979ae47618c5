"""Config: YAML + dotted overrides, presets, errors that name the key, the value and the fix."""
import pytest
import yaml

from nl_pretrain.config import ConfigError, build_config, dump_config, load_config


def test_overrides_and_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  preset: hope-tiny\noptim:\n  lr: 1e-3\n")
    cfg = load_config(str(f), ["--optim.lr=3e-4", "--train.steps=7", "--model.momentum=false",
                               "--model.chunk_mem=8"])
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 7 and cfg.model.momentum is False
    assert cfg.model.chunk_mem == 8 and cfg.model.n_layers == 2          # preset kept, override applied
    again = build_config(yaml.safe_load(dump_config(cfg)))               # the resolved config round-trips
    assert again == cfg


@pytest.mark.parametrize("overrides,message", [
    (["--model.foo=1"], "unknown key 'model.foo'"),
    (["--bogus.x=1"], "unknown key 'bogus'"),
    (["--model.rule=adam"], "model.rule='adam' is not one of \\['gd', 'dgd'\\]"),
    (["--optim.lr=fast"], "optim.lr='fast' is not a number"),
    (["--train.steps=1.5"], "train.steps=1.5 is not an integer"),
    (["--train.steps=0"], "train.steps=0 must be > 0"),
    (["--model.momentum=maybe"], "model.momentum='maybe' is not a boolean"),
    (["--model.n_heads=3"], "model.d_model \\(128\\) must divide by model.n_heads \\(3\\)"),
    (["--model.self_targets=false"], "self_targets=false needs model.adaptive_projections=false"),
    (["--data.seq_len=8192"], "data.seq_len \\(8192\\) exceeds model.max_seq_len"),
    (["optim.lr=1"], "must look like --section.key=value"),
    (["--model.cms=[{kind: step, period: 2, expansion: 1, color: red}]"], "unknown key 'model.cms\\[0\\].color'"),
    (["--model.cms=[{kind: slow}]"], "model.cms\\[0\\].kind='slow' is not one of"),
    (["--data.val_fraction=1"], "data.val_fraction=1.0 must be in \\[0, 1\\)"),
    (["--checkpoint.every=-1"], "checkpoint.every=-1 must be >= 0 \\(0 turns it off\\)"),
    (["--parallel.zero_stage=4"], "parallel.zero_stage=4 is not one of \\[0, 1, 2, 3\\]"),
])
def test_errors_name_key_value_and_choices(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny_hope.yaml", overrides)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="unknown preset 'hope-9b'; choose one of: .*hope-tiny"):
        build_config({"model": {"preset": "hope-9b"}})


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")
