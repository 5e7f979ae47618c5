"""Model presets: ``<family>-<size>`` (docs/MODEL.md D16; Titans Table 5 dimensions).

Sizes 340m / 760m / 1.3b follow the paper's table (32K vocabulary, 4K context); 3b and 7b go beyond
it; ``tiny`` trains on a laptop CPU in minutes. The width of the CMS step levels (``STEP_EXPANSION``)
is chosen per family and size so that the counted parameters land within 5% of the preset's name
(printed by ``nl-pretrain info``, checked in tests/test_presets.py).
"""
from __future__ import annotations

from typing import Any, Dict

SIZES = {
    #        layers  d     heads  vocab  seq   peak lr  tokens in the paper
    "tiny": (2, 128, 4, 4096, 256, 3e-3, None),
    "340m": (24, 1024, 16, 32000, 4096, 1.5e-3, 15e9),
    "760m": (24, 1536, 16, 32000, 4096, 1.25e-3, 30e9),
    "1.3b": (18, 2048, 8, 32000, 4096, 7e-4, 100e9),
    "3b": (32, 2560, 32, 32000, 4096, 5e-4, None),      # 32 heads (80 wide): tensor parallel up to 32
    "7b": (32, 4096, 32, 32000, 4096, 3e-4, None),
}
TARGET_PARAMS = {"340m": 340e6, "760m": 760e6, "1.3b": 1.3e9, "3b": 3e9, "7b": 7e9}

FAMILIES = {
    # HOPE: adaptive projection memories, self-generated targets, momentum, linear projection
    # memories with the exact running gradient, an MLP main memory; CMS = context level + two step
    # levels. Rule gd + L2: on the linear memories this is exactly dgd + dot, the delta rule; dgd + L2
    # erases twice and halves self-generated targets every chunk (docs/MODEL.md, "Rules").
    "hope": dict(adaptive_projections=True, self_targets=True, proj_memory="linear", main_memory="mlp",
                 rule="gd", inner_loss="l2", linear_grad="running", momentum=True),
    "hope_attention": dict(),
    "transformer": dict(),
    # Titans LMM: static projections, plain targets, gd, MLP memory, momentum, decay; unit values
    # (raw values drove its MLP memory to overflow inside a sequence; docs/MODEL.md, "Stability").
    "titans": dict(adaptive_projections=False, self_targets=False, main_memory="mlp", rule="gd",
                   inner_loss="l2", momentum=True, value_norm=True),
    # Gated DeltaNet: static projections, plain targets, gd + running gradient on a linear memory
    # (= the gated delta rule), no momentum, no continuum levels (one ordinary SwiGLU MLP).
    "gated_deltanet": dict(adaptive_projections=False, self_targets=False, main_memory="linear", rule="gd",
                           inner_loss="l2", linear_grad="running", momentum=False),
}

# Step-level expansion (hidden = e * d) per family and size: solved from the parameter budget, then
# rounded to a hidden width that is a multiple of 128 (tensor-parallel shards stay even).
STEP_EXPANSION = {
    "hope": {"tiny": 2.0, "340m": 896 / 1024, "760m": 1280 / 1536, "1.3b": 2816 / 2048, "3b": 2944 / 2560,
             "7b": 4224 / 4096},
    "hope_attention": {"tiny": 2.0, "340m": 1024 / 1024, "760m": 1408 / 1536, "1.3b": 3072 / 2048,
                       "3b": 3072 / 2560, "7b": 4352 / 4096},
    "transformer": {"tiny": 4.0, "340m": 2816 / 1024, "760m": 3968 / 1536, "1.3b": 7808 / 2048, "3b": 8064 / 2560,
                    "7b": 11648 / 4096},
    "titans": {"tiny": 4.0, "340m": 2304 / 1024, "760m": 3328 / 1536, "1.3b": 6784 / 2048, "3b": 7040 / 2560,
               "7b": 10112 / 4096},
    "gated_deltanet": {"tiny": 4.0, "340m": 2432 / 1024, "760m": 3328 / 1536, "1.3b": 7040 / 2048,
                       "3b": 7168 / 2560, "7b": 10240 / 4096},
}
TIED = {"tiny": True, "340m": True, "760m": False, "1.3b": False, "3b": False, "7b": False}


def _cms(family: str, size: str, chunk: int):
    e = STEP_EXPANSION[family][size]
    if family in ("hope", "hope_attention"):
        return [dict(kind="context", period=chunk, expansion=2.0),
                dict(kind="step", period=1, expansion=e),
                dict(kind="step", period=4, expansion=e, lr_scale=1.0)]
    return [dict(kind="step", period=1, expansion=e)]


def preset_names():
    return [f"{f}-{s}" for f in FAMILIES for s in SIZES]


# Table 6 switches as preset suffixes, ``hope-tiny+no_momentum+static_k`` (docs/MODEL.md D21): each is a
# set of config keys applied after the preset (keys given next to the preset still override them).
ABLATIONS = {
    "dgd": "rule=dgd: the paper's Eq. 88 (our presets run plain gd, the Table 6 'w/o DGD' row; D3)",
    "no_momentum": "momentum=false: S_t is the plain gradient step (= momentum with beta = 0)",
    "no_retention": "retention=false: alpha_t = 1 in every memory (Table 6 'w/o weight decay')",
    "no_cms": "the CMS chain replaced by one ordinary SwiGLU MLP of Transformer++'s width for the size",
    "static_k": "k_t = u_t, the static projection the other memories read (no adaptive k memory); the "
                "projection memories' targets are norm-matched (proj_target_match, the k memory's stabilising role)",
    "static_v": "v_t = u_t, the static projection the other memories read (no adaptive v memory)",
    "adaptive_q": "q read from an adaptive q memory (the paper's text keeps q static)",
}
_NEEDS = {"dgd": "smt", "no_momentum": "memory", "no_retention": "memory", "no_cms": "cms",
          "static_k": "adaptive", "static_v": "adaptive", "adaptive_q": "adaptive"}


def _ablate(out: Dict[str, Any], switch: str, family: str, size: str, name: str) -> None:
    if switch not in ABLATIONS:
        raise ValueError(f"unknown switch '+{switch}' in preset '{name}'; choose from: "
                         f"{', '.join('+' + a for a in ABLATIONS)}")
    need = _NEEDS[switch]
    ok = {"smt": family not in ("transformer", "hope_attention"), "memory": family != "transformer",
          "cms": family in ("hope", "hope_attention"), "adaptive": bool(out.get("adaptive_projections", True))}[need]
    if not ok:
        raise ValueError(f"preset '{name}': +{switch} does not apply to the {family} family "
                         f"({ABLATIONS[switch]})")
    mems = list(out.get("projection_memories", ["k", "v", "eta", "alpha"]))
    if switch == "dgd":
        out["rule"] = "dgd"
    elif switch == "no_momentum":
        out["momentum"] = False
    elif switch == "no_retention":
        out["retention"] = False
    elif switch == "no_cms":
        out["cms"] = [dict(kind="step", period=1, expansion=STEP_EXPANSION["transformer"][size])]
    elif switch in ("static_k", "static_v"):
        out["projection_memories"] = [m for m in mems if m != switch[-1]]
        if switch == "static_k":     # without M_k the self-referential writes amplify (docs/MODEL.md §6)
            out["proj_target_match"] = True
    elif switch == "adaptive_q":
        out["projection_memories"] = ["q"] + [m for m in mems if m != "q"]


def preset_model_dict(name: str) -> Dict[str, Any]:
    base, *switches = name.split("+")
    family, _, size = base.rpartition("-")
    if family not in FAMILIES or size not in SIZES:
        raise ValueError(f"unknown preset '{name}'; choose one of: {', '.join(preset_names())} "
                         f"(optionally with Table 6 switches: {', '.join('+' + a for a in ABLATIONS)})")
    layers, d, heads, vocab, seq, _, _ = SIZES[size]
    chunk = 16 if size == "tiny" else 64
    out = dict(preset=name, family=family, vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
               max_seq_len=seq, tie_embeddings=TIED[size], chunk_mem=chunk, chunk_proj=chunk,
               cms=_cms(family, size, chunk))
    out.update(FAMILIES[family])
    for switch in switches:
        _ablate(out, switch, family, size, name)
    return out


def preset_lr(name: str) -> float:
    return SIZES[name.split("+")[0].rpartition("-")[2]][5]
