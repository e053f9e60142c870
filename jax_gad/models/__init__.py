"""Flax model definitions."""
