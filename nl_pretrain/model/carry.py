"""What a stateful layer hands from one segment of a sequence to the next (inference).

A layer called with ``carry=`` starts from the carried state instead of its learned initial one and
returns ``(output, new carry)``. Running a sequence in segments that start at multiples of the
layer's ``doc_alignment`` (every chunk boundary stays in place) computes exactly the function of
one call over the whole sequence: this is what :mod:`nl_pretrain.infer` builds decoding on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch


@dataclass
class Carry:
    states: Dict[str, Tuple[torch.Tensor, ...]]              # memory -> fast weights, rows B*H (batch-major)
    moms: Dict[str, Optional[Tuple[torch.Tensor, ...]]]      # memory -> momentum (None without momentum)
    conv: Dict[str, torch.Tensor] = field(default_factory=dict)   # convolution -> its last K-1 inputs (B, K-1, C)

    def tensors(self):
        for group in (self.states, self.moms):
            for value in group.values():
                yield from (value or ())
        yield from self.conv.values()
