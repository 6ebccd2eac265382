"""Methods, one per file; importing this package registers the built-ins."""

from plrm.methods import bt, lore, lore_alt, pref  # noqa: F401
