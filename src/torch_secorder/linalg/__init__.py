"""Matrix-free algorithms on any batched matrix product ``V -> V A`` (no models here)."""

from torch_secorder.linalg.probes import draw_probes
from torch_secorder.linalg.trace import TraceEstimate, hutchinson

__all__ = ["TraceEstimate", "draw_probes", "hutchinson"]
