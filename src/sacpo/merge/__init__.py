"""sacpo.merge."""
