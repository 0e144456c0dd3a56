"""Embedded default worlds and fixtures (no hub downloads)."""
