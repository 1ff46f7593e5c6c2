"""The batch every part of the stack hands on: ``{"input_ids": (B, T), "labels": (B, T)}``, int64, where
``labels[b, t]`` is the target of position t, or ``IGNORE_INDEX`` where no loss is taken (the token after an
end-of-document, padding). -100 is torch's and HuggingFace's default ignore index, so the reference model's
loss agrees without an argument."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

Batch = dict[str, torch.Tensor]
