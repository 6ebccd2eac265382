"""Backbones; importing this package registers the built-ins."""

from plrm.backbones import causal_lm, frozen, precomputed, transformer  # noqa: F401
