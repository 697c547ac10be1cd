"""Radiograph I/O and geometry: host-agnostic (no ``comfy`` import)."""
