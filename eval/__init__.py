"""Evaluation for Mask2Anomaly: pixel and component metrics (``metrics/``), the benchmark-reader registry
(``datasets.py``), the label-PNG reader (``io.py``), the one evaluation loop (``loop.py``) and the benchmark runner
(``run.py``, `mask2anomaly-eval`).

Installed as ``mask2anomaly_eval``.
"""
