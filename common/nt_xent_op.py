"""Placeholder until the fused op lands (issue 3): reports the op as unavailable."""

import torch


def available(device: torch.device) -> bool:
    return False


def load_error() -> str:
    return "the extension is not part of this build yet"


def nt_xent_fused(rows, cols, pos_idx, self_idx, temperature):
    raise RuntimeError(load_error())
