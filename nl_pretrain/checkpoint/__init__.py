"""Sharded checkpoints: the on-disk store (content-agnostic). See docs/CHECKPOINT_STORE.md."""
from nl_pretrain.checkpoint.store import (CheckpointError, CheckpointStore, CheckpointWarning, LocalComm,
                                          TorchDistComm, snapshot_to_host)

__all__ = ["CheckpointError", "CheckpointStore", "CheckpointWarning", "LocalComm", "TorchDistComm",
           "snapshot_to_host"]
