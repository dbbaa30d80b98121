"""Bundled public-domain series (see docs/data.md)."""
