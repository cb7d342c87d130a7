"""Evaluation for Mask2Anomaly: pixel and component metrics, benchmark readers and the benchmark runner.

Installed as ``mask2anomaly_eval``.
"""
