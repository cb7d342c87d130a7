"""Former home of the pixel metrics (now :mod:`mask2anomaly_eval.metrics`). Kept only because
``training/train.py:evaluate_anomaly`` still imports it; delete this file once that function calls
:func:`mask2anomaly_eval.loop.evaluate`."""

from .metrics.pixel import PixelMetricAccumulator

__all__ = ["PixelMetricAccumulator"]
