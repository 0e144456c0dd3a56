"""sacpo — constrained alignment of language models (SACPO, P-SACPO and the alignment toolbox)."""

__version__ = "0.1.0"
