"""``nl-pretrain export --format hf``: a directory that ``transformers`` loads.

``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` and
``AutoTokenizer.from_pretrained(out)`` read it: ``config.json`` (the run's ``model:`` section plus
``auto_map``), ``model.safetensors`` (the single-device model's tensors under ``model.``),
``configuration_nl_pretrain.py`` / ``modeling_nl_pretrain.py`` (which import the ``nl-pretrain``
package: the export needs it installed), ``generation_config.json`` and the run's tokenizer as a
``PreTrainedTokenizerFast`` (``tokenizer.json``, ``tokenizer_config.json``). docs/INFERENCE.md.

The source is a checkpoint (``step-XXXXXXXX`` or a checkpoint root) or a native export directory
(``model.safetensors`` + ``config.yaml``); the tokenizer is the one it carries, or ``--tokenizer``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch

NATIVE_FILES = ("model.safetensors", "config.yaml")
TOKENIZER_FILE = "tokenizer.json"


def _tokenizer_from_option(path: str) -> str:
    """``--tokenizer``: a tokenizer.json, a prepared dataset directory, or ``bytes`` (the byte corpus)."""
    if path == "bytes":
        from nl_pretrain.infer.tokenizer import byte_tokenizer_json
        return byte_tokenizer_json()
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise FileNotFoundError(f"--tokenizer {path}: no tokenizer.json there; pass the prepared dataset directory "
                                f"the model was trained on, its tokenizer.json, or 'bytes' for the built-in byte corpus")
    return p.read_text(encoding="utf-8")


def _no_tokenizer(source: str) -> ValueError:
    return ValueError(f"{source} carries no tokenizer (it was written before checkpoints carried one); pass "
                      f"--tokenizer with the prepared dataset directory the model was trained on (or its "
                      f"tokenizer.json), or --tokenizer bytes for the built-in byte corpus")


def resolve_source(checkpoint: str, tokenizer: Optional[str]) -> Tuple[str, Path, str]:
    """``(kind, path, tokenizer json)`` of a checkpoint or export, ``kind`` "export" or "checkpoint":
    every check (kind of directory, tokenizer present) before any weight is read."""
    from nl_pretrain.checkpoint.export import resolve_checkpoint
    from nl_pretrain.checkpoint.store import CheckpointStore
    src = Path(checkpoint)
    if src.is_dir() and all((src / n).is_file() for n in NATIVE_FILES):       # an `nl-pretrain export` dir
        if tokenizer is None and not (src / TOKENIZER_FILE).is_file():
            raise _no_tokenizer(str(src))
        tok_json = _tokenizer_from_option(tokenizer) if tokenizer else (src / TOKENIZER_FILE).read_text("utf-8")
        return "export", src, tok_json
    try:
        path = resolve_checkpoint(checkpoint)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"--checkpoint {checkpoint}: not a checkpoint (step-XXXXXXXX with index.json), a checkpoint root "
            f"holding one, or an nl-pretrain export (model.safetensors + config.yaml); point it at "
            f"<run_dir>/checkpoints") from None
    if tokenizer is not None:
        return "checkpoint", path, _tokenizer_from_option(tokenizer)
    record = CheckpointStore(path.parent).read(path, "common.pt").get("tokenizer")
    if record is None:
        raise _no_tokenizer(str(path))
    return "checkpoint", path, record["json"]


def load_source(checkpoint: str, tokenizer: Optional[str]) -> Tuple[object, dict, str, str]:
    """``(model config, tensors, tokenizer json, source path)``."""
    kind, path, tok_json = resolve_source(checkpoint, tokenizer)
    if kind == "export":
        from nl_pretrain.checkpoint.export import load_exported
        model, cfg = load_exported(str(path))
        return cfg.model, dict(model.state_dict()), tok_json, str(path)
    from nl_pretrain.checkpoint.export import consolidate
    path, _, cfg, tensors = consolidate(str(path))
    return cfg.model, tensors, tok_json, str(path)


def hf_tokenizer(tok_json: str):
    """Our tokenizer as a ``PreTrainedTokenizerFast``: the same ids as ``TextTokenizer.encode`` for any
    text (special-token strings in text stay text), with ``<|bos|>`` prepended as every training
    document starts with it (``add_special_tokens=False`` leaves it out)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast
    from data_pipeline.tokenizer import BOS, EOS, PAD
    tok = Tokenizer.from_str(tok_json)
    bos = tok.token_to_id(BOS)
    if bos is None or tok.token_to_id(EOS) is None or tok.token_to_id(PAD) is None:
        raise ValueError(f"the tokenizer lacks the special tokens {BOS}, {EOS}, {PAD}; prepare it with "
                         f"`nl-pretrain prepare-data --tokenizer` (which adds them) and pass --tokenizer")
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   split_special_tokens=True, model_input_names=["input_ids", "attention_mask"])


def export_hf(checkpoint: str, out: str, tokenizer: Optional[str] = None) -> dict:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ValueError("--format hf needs the transformers package; install the hf extra "
                         "(pip install -e '.[hf]' -c constraints-cpu.txt)") from None
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory; choose a directory")
    model_cfg, tensors, tok_json, source = load_source(checkpoint, tokenizer)
    from nl_pretrain.config import to_dict
    from nl_pretrain.hf.configuration_nl_pretrain import NLPretrainConfig
    from nl_pretrain.hf.modeling_nl_pretrain import NLPretrainForCausalLM
    tok = hf_tokenizer(tok_json)
    if len(tok) > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but model.vocab_size is {model_cfg.vocab_size}; "
                         f"pass the --tokenizer the model was trained with")
    config = NLPretrainConfig(nl_model=to_dict(model_cfg), bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device("meta"):
        hf = NLPretrainForCausalLM(config)
    hf.model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True, assign=True)
    from transformers import GenerationConfig
    # generate() picks what `nl-pretrain generate` may pick: the tokenizer's tokens, never PAD or BOS
    never = sorted(set(range(len(tok), model_cfg.vocab_size)) | {tok.pad_token_id, tok.bos_token_id})
    hf.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id, suppress_tokens=never)
    NLPretrainConfig.register_for_auto_class()                    # writes auto_map and copies the code
    NLPretrainForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.part-", dir=out_dir.parent))
    try:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        out_dir.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):                           # complete files only, then renamed
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"checkpoint": source, "parameters": sum(t.numel() for t in tensors.values()),
            "files": sorted(p.name for p in out_dir.iterdir()), "out": str(out_dir)}
