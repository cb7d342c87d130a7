"""Mask2Anomaly for transformers."""
