"""nearest_code: Python API. (Placeholder: reference only until the native kernel lands.)"""
from __future__ import annotations

import torch

from .reference import nearest_code_reference


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2"):
    return nearest_code_reference(x, codebook, metric)
