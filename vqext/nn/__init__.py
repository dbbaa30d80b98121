"""Layers built on vqext's ops."""
