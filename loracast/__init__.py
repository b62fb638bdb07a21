"""LoraCast's shared package: what more than one component needs (base model, adapter format, CLI)."""

__version__ = "0.1.0"
