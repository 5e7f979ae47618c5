"""Data pipeline: sources -> byte-level BPE -> packed WebDataset shards (Ray) -> resumable loader.

See docs/DATA.md. ``prepare_dataset`` imports Ray only when it runs.
"""
from data_pipeline.loader import TokenLoader
from data_pipeline.manifest import load_manifest, verify_dataset
from data_pipeline.prepare import prepare_dataset
from data_pipeline.tokenizer import load_tokenizer

__all__ = ["TokenLoader", "load_tokenizer", "prepare_dataset", "load_manifest", "verify_dataset"]
