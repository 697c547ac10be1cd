"""Placeholder: filled in by the mask-sources work."""

NODES: list = []
