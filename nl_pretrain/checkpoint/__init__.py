"""Sharded, layout-independent checkpoints (docs/CHECKPOINT.md)."""
from nl_pretrain.checkpoint.store import (CheckpointError, CheckpointStore, CheckpointWarning, LocalComm,
                                          TorchDistComm, snapshot_to_host)

__all__ = ["CheckpointError", "CheckpointStore", "CheckpointWarning", "LocalComm", "TorchDistComm",
           "snapshot_to_host"]
