"""The method as a host-agnostic torch core. No ``comfy`` import here (only a future host adapter may)."""

from .organs import KNOWN_ORGANS, OrganMasks

__all__ = ["KNOWN_ORGANS", "OrganMasks"]
