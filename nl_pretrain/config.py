"""Typed run configuration: dataclasses, YAML files and dotted command-line overrides.

``load_config("configs/tiny_hope.yaml", ["--optim.lr=3e-4"])`` returns a validated
:class:`RunConfig`. Unknown keys and invalid values raise :class:`ConfigError` naming the key,
the value and what is allowed. ``model.preset`` fills model defaults from
:mod:`nl_pretrain.presets`; keys given next to it override the preset.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class CMSLevel:
    kind: str = "step"            # step | context
    period: int = 1               # step: optimizer steps; context: tokens (the chunk size)
    expansion: float = 4.0        # hidden width = expansion * d (step) or * d_h (context)
    lr_scale: float = 1.0         # step levels: learning-rate multiplier
    phase: int = -1               # step levels: stagger offset; -1 = automatic


@dataclass
class ModelConfig:
    preset: str = ""              # e.g. hope-tiny, transformer-760m: fills defaults
    family: str = "hope"          # hope | hope_attention | transformer | titans | gated_deltanet
    vocab_size: int = 32000
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 4096
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    rope_theta: float = 10000.0
    # Self-modifying Titans (docs/MODEL.md D2-D12)
    adaptive_projections: bool = True
    self_targets: bool = True
    proj_memory: str = "linear"   # linear | mlp (k, v, eta, alpha memories)
    main_memory: str = "mlp"      # linear | mlp
    memory_expansion: float = 2.0 # mlp memories: hidden = expansion * d_h
    rule: str = "dgd"             # gd | dgd
    inner_loss: str = "l2"        # l2 | dot
    linear_grad: str = "running"  # running | chunk_start (linear memories)
    momentum: bool = True
    chunk_mem: int = 16
    chunk_proj: int = 16
    eta_max: float = 1.0
    mlp_eta_scale: float = 0.1    # MLP memories (chunk-start gradients, unnormalised hidden keys) see eta * this
    eta_chunk_mean: bool = True   # chunk-start-gradient memories use eta_t / C (the chunk's mean gradient)
    conv_kernel: int = 4
    memory_impl: str = "auto"     # auto | torch | triton | reference
    # Continuum Memory System (§4.3); transformer: one step level with period 1
    cms: List[CMSLevel] = field(default_factory=lambda: [CMSLevel()])


@dataclass
class DataConfig:
    dataset: str = ""             # a prepared dataset dir (nl-pretrain prepare-data); "" = built-in byte corpus
    source: str = "default"       # built-in byte corpus: "default" (stdlib) or a directory of .txt
    seq_len: int = 256
    max_documents: int = 0        # built-in corpus: cap on documents (0 = all)
    val_fraction: float = 0.01
    num_workers: int = 0


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 300
    micro_batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda
    precision: str = "fp32"       # fp32 | bf16 (autocast)
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    run_dir: str = "runs/default"
    progress: bool = True
    threads: int = 0              # torch intra-op threads (0 = torch default)
    resume: str = ""              # "" (fresh run) | auto (newest complete checkpoint, if any) | a checkpoint dir
    on_nan: str = "skip"          # non-finite loss: skip the step | rollback to the last checkpoint | stop
    max_nan_steps: int = 5        # consecutive non-finite steps tolerated before stopping


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    zero_stage: int = 0
    activation_checkpointing: bool = False   # recompute each block in backward (DeepSpeed runtime)


@dataclass
class CheckpointConfig:
    save_final: bool = True
    every: int = 0                # steps between saves (0 = only the final one)
    dir: str = ""                 # "" = <train.run_dir>/checkpoints (shared by every rank)
    keep_last: int = 3            # complete checkpoints kept (0 = all)
    keep_every: int = 0           # also keep steps that are multiples of this (0 = off)
    async_save: bool = False      # write in a background thread (host copy first; one save in flight)
    verify: str = "full"          # resume checks: full (sha256 of every file) | size


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


CHOICES = {
    "model.family": ("hope", "hope_attention", "transformer", "titans", "gated_deltanet"),
    "model.proj_memory": ("linear", "mlp"),
    "model.main_memory": ("linear", "mlp"),
    "model.rule": ("gd", "dgd"),
    "model.inner_loss": ("l2", "dot"),
    "model.linear_grad": ("running", "chunk_start"),
    "model.memory_impl": ("auto", "torch", "triton", "reference"),
    "model.cms.kind": ("step", "context"),
    "optim.name": ("adamw",),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("fp32", "bf16"),
    "parallel.zero_stage": (0, 1, 2, 3),
    "train.on_nan": ("skip", "rollback", "stop"),
    "checkpoint.verify": ("full", "size"),
}
POSITIVE = {
    "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.max_seq_len",
    "model.chunk_mem", "model.chunk_proj", "model.conv_kernel", "model.memory_expansion",
    "model.cms.period", "model.cms.expansion", "data.seq_len", "optim.lr", "train.steps",
    "train.micro_batch_size", "train.grad_accum", "train.log_every", "train.eval_every",
    "parallel.tensor", "parallel.pipeline",
}


def _coerce(path: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return _from_dict(typ, value, path)
    if origin in (list, List):
        (item,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}={value!r} is not a boolean (use true or false)")
    if typ in (int, float):
        return _number(path, value, typ)
    if typ is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{path}={value!r} must be a string")
        return str(value)
    return value


def _number(path: str, value: Any, typ: type):
    kind = "an integer" if typ is int else "a number"
    if isinstance(value, bool):
        raise ConfigError(f"{path}={value!r} is not {kind}")
    try:
        num = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}={value!r} is not {kind}") from None
    if typ is float:
        return num
    if num != int(num):
        raise ConfigError(f"{path}={value!r} is not {kind}")
    return int(num)


def _from_dict(cls, data: Dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"unknown key '{(prefix + '.' if prefix else '') + unknown[0]}' in {where}; "
                          f"allowed: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: Dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override --{dotted}: '{k}' is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def parse_overrides(args: List[str]) -> List[tuple]:
    out = []
    for a in args:
        if not a.startswith("--") or "=" not in a:
            raise ConfigError(f"override '{a}' must look like --section.key=value (e.g. --optim.lr=3e-4)")
        key, raw = a[2:].split("=", 1)
        out.append((key, raw))
    return out


def _walk_validate(cfg: RunConfig) -> None:
    def check(path, value):
        generic = ".".join(p.split("[")[0] for p in path.split("."))   # model.cms[0].kind -> model.cms.kind
        if generic in CHOICES and value not in CHOICES[generic]:
            raise ConfigError(f"{path}={value!r} is not one of {list(CHOICES[generic])}")
        if generic in POSITIVE and not value > 0:
            raise ConfigError(f"{path}={value!r} must be > 0")

    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            path = f"{section.name}.{f.name}"
            if isinstance(value, list):
                for i, item in enumerate(value):
                    for g in dataclasses.fields(item):
                        check(f"{path}[{i}].{g.name}", getattr(item, g.name))
            else:
                check(path, value)
    m = cfg.model
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) must divide by model.n_heads ({m.n_heads})")
    if m.adaptive_projections and not m.self_targets:
        raise ConfigError("model.self_targets=false needs model.adaptive_projections=false: plain targets "
                          "v_t are undefined for the scalar eta/alpha memories (docs/MODEL.md)")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1)")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    for i, lvl in enumerate(m.cms):
        if lvl.kind == "step" and lvl.phase >= lvl.period:
            raise ConfigError(f"model.cms[{i}].phase ({lvl.phase}) must be < period ({lvl.period}) or -1 (auto)")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio} must be in [0, 1]")


def build_config(tree: Dict[str, Any]) -> RunConfig:
    tree = dict(tree or {})
    model = dict(tree.get("model") or {})
    if model.get("preset"):
        from nl_pretrain.presets import preset_model_dict
        merged = preset_model_dict(model["preset"])
        merged.update(model)
        tree["model"] = merged
    cfg = _from_dict(RunConfig, tree)
    _walk_validate(cfg)
    return cfg


def load_config(path: Optional[str], overrides: Optional[List[str]] = None) -> RunConfig:
    tree: Dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist (see configs/ for examples)")
        tree = yaml.safe_load(p.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    for key, raw in parse_overrides(overrides or []):
        _set_dotted(tree, key, raw)
    return build_config(tree)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
