"""sacpo.models."""
