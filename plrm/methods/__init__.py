"""Methods, one per file; importing this package registers the built-ins."""

from plrm.methods import bt, lore, lore_alt, mrm, pref  # noqa: F401
