"""Methods, one per file; importing this package registers the built-ins."""

from plrm.methods import bt, genarm, lore, lore_alt, mrm, pdpo, pref  # noqa: F401
