"""Backbones; importing this package registers the built-ins."""

from plrm.backbones import frozen, precomputed, transformer  # noqa: F401
