"""Inference-time alignment: best-of-n, controlled decoding and prefix scorers."""
