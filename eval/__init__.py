"""Evaluation for Mask2Anomaly: pixel and component metrics (``metrics/``), the benchmark-reader registry
(``datasets.py``), the label-PNG reader (``io.py``), the one evaluation loop (``loop.py``), per-image rows and
accumulators (``per_image.py``), bootstrap intervals (``bootstrap.py``), curve pictures and heatmaps
(``figures.py``), tables of many results (``compare.py``), the SegmentMeIfYouCan and Fishyscapes submission formats
(``submission.py``), closed-set mIoU (``semantic.py``) and the benchmark runner (``run.py``, `mask2anomaly-eval`).

Installed as ``mask2anomaly_eval``.
"""
