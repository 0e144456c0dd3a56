"""sacpo.train."""
