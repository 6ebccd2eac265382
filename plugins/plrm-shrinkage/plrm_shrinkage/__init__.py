"""plrm-shrinkage: an example plrm plugin with one method, ``shrunk_individual`` (see plrm_shrinkage.method)."""

__version__ = "0.1.0"
