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


def option(default: Any, choices: Optional[tuple] = None, *, gt: Any = None, ge: Any = None, lt: Any = None,
           le: Any = None, note: str = ""):
    """A config field with its constraints next to its declaration: ``choices`` (allowed values) and
    bounds (``gt``/``ge``/``lt``/``le``). Checked for every key a config gives, with an error that
    names the key, the value and what is allowed (``note`` is appended to a bound's message)."""
    meta = {"choices": choices, "gt": gt, "ge": ge, "lt": lt, "le": le, "note": note}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def positive(default: Any):
    return option(default, gt=0)


def _check_field(path: str, value: Any, meta) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}={value!r} is not one of {list(choices)}")
    gt, ge, lt, le = (meta.get(k) for k in ("gt", "ge", "lt", "le"))
    lo, hi = (ge if gt is None else gt), (le if lt is None else lt)
    if ((lo is None or (value > lo if gt is not None else value >= lo))
            and (hi is None or (value < hi if lt is not None else value <= hi))):
        return
    note = f" {meta['note']}" if meta.get("note") else ""
    if lo is not None and hi is not None:
        brackets = ("(" if gt is not None else "[") + f"{lo}, {hi}" + (")" if lt is not None else "]")
        raise ConfigError(f"{path}={value!r} must be in {brackets}{note}")
    if lo is not None:
        raise ConfigError(f"{path}={value!r} must be {'>' if gt is not None else '>='} {lo}{note}")
    raise ConfigError(f"{path}={value!r} must be {'<' if lt is not None else '<='} {hi}{note}")


FAMILIES = ("hope", "hope_attention", "transformer", "titans", "gated_deltanet")
MEMORY_KINDS = ("linear", "mlp")
OPTIMIZERS = ("adamw", "muon", "m3", "delta_momentum", "dmgd")


@dataclass
class CMSLevel:
    kind: str = option("step", ("step", "context"))
    period: int = positive(1)     # step: optimizer steps; context: tokens (the chunk size)
    expansion: float = positive(4.0)   # hidden width = expansion * d (step) or * d_h (context)
    lr_scale: float = 1.0         # step levels: learning-rate multiplier
    phase: int = option(-1, ge=-1, note="(-1 = automatic)")   # step levels: stagger offset, < period
    # step levels: the period in training tokens instead of steps (0 = use period); converted with the global
    # batch (micro x accum x data parallel x seq_len) by resolve_token_periods, an error unless it divides evenly
    period_tokens: int = option(0, ge=0, note="(0 = use period)")
    # step levels: their own outer optimizer ("" = optim.name; docs/MODEL.md D20); its lr is lr_scale x the schedule
    optimizer: str = option("", ("",) + OPTIMIZERS)


@dataclass
class ModelConfig:
    preset: str = ""              # e.g. hope-tiny, transformer-760m: fills defaults
    family: str = option("hope", FAMILIES)
    vocab_size: int = positive(32000)
    d_model: int = positive(256)
    n_layers: int = positive(4)
    n_heads: int = positive(4)
    max_seq_len: int = positive(4096)
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    rope_theta: float = 10000.0
    # Self-modifying Titans (docs/MODEL.md D2-D12)
    adaptive_projections: bool = True
    self_targets: bool = True
    proj_memory: str = option("linear", MEMORY_KINDS)   # the k, v, eta, alpha memories
    main_memory: str = option("mlp", MEMORY_KINDS)
    memory_expansion: float = positive(2.0)   # mlp memories: hidden = expansion * d_h
    rule: str = option("dgd", ("gd", "dgd"))
    inner_loss: str = option("l2", ("l2", "dot"))
    linear_grad: str = option("running", ("running", "chunk_start"))   # linear memories
    momentum: bool = True
    chunk_mem: int = positive(16)
    chunk_proj: int = positive(16)
    eta_max: float = 1.0
    mlp_eta_scale: float = 0.1    # MLP memories (chunk-start gradients, unnormalised hidden keys) see eta * this
    eta_chunk_mean: bool = True   # chunk-start-gradient memories use eta_t / C (the chunk's mean gradient)
    conv_kernel: int = positive(4)
    memory_impl: str = option("auto", ("auto", "torch", "triton", "reference"))
    # Table 6 switches (docs/MODEL.md D21): the projections that are adaptive memories when
    # adaptive_projections is true (a subset of q, k, v, eta, alpha; the rest are static projections
    # of x), and retention (false: alpha_t = 1 in every memory, i.e. no weight decay)
    projection_memories: List[str] = field(default_factory=lambda: ["k", "v", "eta", "alpha"])
    retention: bool = True
    # static values l2-normalised, v_t / |v_t| (Titans: its MLP memory diverged on raw values; "Stability")
    value_norm: bool = False
    context_target_norm: bool = True    # CMS context levels write l2-normalised targets (docs/MODEL.md §6)
    # projection memories' self-generated targets rescaled to the norm of the memory's read at the write key,
    # |M_ref(k)| M_ref(vbar) / |M_ref(vbar)|: a write can turn a read but not grow it (+static_k; MODEL.md §6)
    proj_target_match: bool = False
    # PyTorch memory path: keep only chunk-start states for the backward and recompute inside each chunk
    # (long context when memory is tight; docs/PARALLEL.md "Long context"; the Triton kernels always do)
    recompute_chunks: bool = False
    # Continuum Memory System (docs/MODEL.md D13, D14); transformer: one step level with period 1
    cms: List[CMSLevel] = field(default_factory=lambda: [CMSLevel()])


@dataclass
class DataConfig:
    dataset: str = ""             # a prepared dataset dir (nl-pretrain prepare-data); "" = built-in byte corpus
    source: str = "default"       # built-in byte corpus: "default" (stdlib) or a directory of .txt
    seq_len: int = positive(256)
    max_documents: int = 0        # built-in corpus: cap on documents (0 = all)
    val_fraction: float = option(0.01, ge=0, lt=1)
    num_workers: int = 0
    # prepared datasets: check shards at start by size (cheap) or sha256 (reads every byte; also
    # `nl-pretrain verify-data DIR`); skip_corrupt: an unreadable sample becomes a padding row (no loss),
    # counted (metrics `skipped_samples`) and logged, instead of stopping the run
    verify: str = option("size", ("size", "full"))
    skip_corrupt: bool = False


@dataclass
class MuonConfig:                 # docs/MODEL.md, "Outer optimizers"
    momentum: float = option(0.95, ge=0, lt=1)
    nesterov: bool = True
    ns_steps: int = positive(5)
    scale: str = option("rms", ("rms", "shape", "none"))   # rms: 0.2 sqrt(max(m, n)), AdamW-sized updates


@dataclass
class M3Config:                   # paper Algorithm 1
    variant: str = option("ema", ("ema", "printed"))    # printed: sums without decay, as Algorithm 1 prints
    beta1: float = option(0.9, ge=0, lt=1)   # fast momentum M1
    beta2: float = option(0.95, ge=0, lt=1)  # second moment V
    beta3: float = option(0.9, ge=0, lt=1)   # slow momentum M2
    alpha: float = option(1.0, ge=0)         # weight of the slow momentum
    frequency: int = positive(8)             # f: M2 is updated once every f steps
    eps: float = positive(1e-8)
    ns_steps: int = positive(5)
    scale: str = option("rms", ("rms", "shape", "none"))   # rms: the update rescaled to RMS 0.2


@dataclass
class DeltaMomentumConfig:        # Eqs. 48-49
    alpha: float = option(0.95, gt=0, le=1)
    orthogonalize: bool = True
    ns_steps: int = positive(5)
    scale: str = option("rms", ("rms", "shape", "none"))


@dataclass
class DMGDConfig:                 # Eq. 50 (and Eq. 52 with orthogonalize)
    hidden: int = positive(32)               # memory width h (capped by both matrix dimensions)
    lr: float = positive(0.1)                # the memory's own learning rate
    decay: float = option(1.0, gt=0, le=1)   # the memory's own decay (alpha in Eq. 50)
    orthogonalize: bool = True
    ns_steps: int = positive(5)
    scale: str = option("rms", ("rms", "shape", "none"))
    seed: int = 0                            # memory initialisation


@dataclass
class OptimConfig:
    name: str = option("adamw", OPTIMIZERS)
    # resuming with another optimizer than the checkpoint's: an error unless true (then its state starts fresh)
    allow_switch: bool = False
    muon: MuonConfig = field(default_factory=MuonConfig)
    m3: M3Config = field(default_factory=M3Config)
    delta_momentum: DeltaMomentumConfig = field(default_factory=DeltaMomentumConfig)
    dmgd: DMGDConfig = field(default_factory=DMGDConfig)
    lr: float = positive(1e-3)
    min_lr_ratio: float = option(0.1, ge=0, le=1)
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    steps: int = positive(300)
    micro_batch_size: int = positive(8)
    grad_accum: int = positive(1)
    seed: int = 0
    device: str = option("auto", ("auto", "cpu", "cuda"))
    precision: str = option("fp32", ("fp32", "bf16"))   # bf16: autocast (one process), DeepSpeed bf16 (distributed)
    log_every: int = positive(10)
    eval_every: int = positive(100)
    eval_batches: int = 8
    run_dir: str = "runs/default"
    progress: bool = True
    threads: int = 0              # torch intra-op threads (0 = the cores this process may use / local ranks)
    resume: str = ""              # "" (fresh run) | auto (newest complete checkpoint, if any) | a checkpoint dir
    # non-finite loss: skip the step | rollback to the last checkpoint | stop
    on_nan: str = option("skip", ("skip", "rollback", "stop"))
    max_nan_steps: int = option(5, ge=1)   # consecutive non-finite steps tolerated before stopping


@dataclass
class ParallelConfig:
    tensor: int = positive(1)
    pipeline: int = positive(1)
    zero_stage: int = option(0, (0, 1, 2, 3))
    activation_checkpointing: bool = False   # recompute each block in backward (DeepSpeed runtime)


@dataclass
class CheckpointConfig:
    save_final: bool = True
    every: int = option(0, ge=0, note="(0 turns it off)")        # steps between saves (0 = only the final one)
    dir: str = ""                 # "" = <train.run_dir>/checkpoints (shared by every rank)
    keep_last: int = option(3, ge=0, note="(0 turns it off)")    # complete checkpoints kept (0 = all)
    keep_every: int = option(0, ge=0, note="(0 turns it off)")   # also keep multiples of this step
    async_save: bool = False      # write in a background thread (host copy first; one save in flight)
    verify: str = option("full", ("full", "size"))   # resume checks: sha256 of every file | sizes only


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


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
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        path = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _coerce(path, v, hints[k])
        _check_field(path, kwargs[k], fields[k].metadata)
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
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"override --{dotted}={raw}: the value is not valid YAML; quote it or fix it") from None


def parse_overrides(args: List[str]) -> List[tuple]:
    out = []
    for a in args:
        if not a.startswith("--") or "=" not in a:
            raise ConfigError(f"override '{a}' must look like --section.key=value (e.g. --optim.lr=3e-4)")
        key, raw = a[2:].split("=", 1)
        out.append((key, raw))
    return out


def _check_relations(cfg: RunConfig) -> None:
    """Constraints between fields (each field's own are declared with it)."""
    m = cfg.model
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) must divide by model.n_heads ({m.n_heads})")
    if m.adaptive_projections and not m.self_targets:
        raise ConfigError("model.self_targets=false needs model.adaptive_projections=false: plain targets "
                          "v_t are undefined for the scalar eta/alpha memories (docs/MODEL.md)")
    projections = ("q", "k", "v", "eta", "alpha")
    for name in m.projection_memories:
        if name not in projections or m.projection_memories.count(name) > 1:
            raise ConfigError(f"model.projection_memories={m.projection_memories!r}: each entry must be one of "
                              f"{list(projections)}, at most once")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    for i, lvl in enumerate(m.cms):
        if lvl.kind == "step" and lvl.phase >= lvl.period:
            raise ConfigError(f"model.cms[{i}].phase ({lvl.phase}) must be < period ({lvl.period}) or -1 (auto)")
        if lvl.kind == "context" and lvl.optimizer:
            raise ConfigError(f"model.cms[{i}].optimizer={lvl.optimizer!r} applies to step levels only (a context "
                              f"level's weights are fast weights updated by its inner rule); remove it")


def resolve_token_periods(cfg: RunConfig, data_parallel: int) -> RunConfig:
    """Step levels given ``period_tokens``: ``period = period_tokens / tokens per optimizer step``
    (``micro_batch_size x grad_accum x data_parallel x seq_len``), in place; exact or an error."""
    t = cfg.train
    per_step = t.micro_batch_size * t.grad_accum * data_parallel * cfg.data.seq_len
    for i, lvl in enumerate(cfg.model.cms):
        if not lvl.period_tokens:
            continue
        if lvl.kind != "step":
            raise ConfigError(f"model.cms[{i}].period_tokens applies to step levels only (a context level's "
                              f"period is its chunk in tokens already); use model.cms[{i}].period")
        if lvl.period_tokens % per_step:
            lo = max(1, lvl.period_tokens // per_step)
            raise ConfigError(f"model.cms[{i}].period_tokens ({lvl.period_tokens}) must divide by the tokens per "
                              f"optimizer step ({per_step} = micro {t.micro_batch_size} x accum {t.grad_accum} x "
                              f"data {data_parallel} x seq_len {cfg.data.seq_len}); use {lo * per_step} or "
                              f"{(lo + 1) * per_step}")
        lvl.period = lvl.period_tokens // per_step
        if lvl.phase >= lvl.period:
            raise ConfigError(f"model.cms[{i}].phase ({lvl.phase}) must be < period ({lvl.period} steps from "
                              f"period_tokens {lvl.period_tokens}) or -1 (auto)")
    return cfg


def build_config(tree: Dict[str, Any]) -> RunConfig:
    tree = dict(tree or {})
    model = dict(tree.get("model") or {})
    if model.get("preset"):
        from nl_pretrain.presets import preset_model_dict
        merged = preset_model_dict(model["preset"])
        merged.update(model)
        tree["model"] = merged
    cfg = _from_dict(RunConfig, tree)
    _check_relations(cfg)
    return cfg


def load_config(path: Optional[str], overrides: Optional[List[str]] = None) -> RunConfig:
    tree: Dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist (see configs/ for examples)")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark, ctx = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            if ctx is not None and mark is not None and ctx.line != mark.line:
                where += f" (in what {getattr(exc, 'context', None) or 'starts'} at line {ctx.line + 1})"
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"config file '{path}'{where}: not valid YAML ({what}); fix the file") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    for key, raw in parse_overrides(overrides or []):
        _set_dotted(tree, key, raw)
    return build_config(tree)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
