"""Backbones; importing this package registers the built-ins."""

from plrm.backbones import precomputed, transformer  # noqa: F401
