"""Placeholder: filled in by the training-node work."""

NODES: list = []
