"""The torch.library namespace ``popcomp`` that every op is defined and registered in."""
from __future__ import annotations

import torch

LIB = torch.library.Library("popcomp", "DEF")
