"""Training for Mask2Anomaly: datasets (Cityscapes, outlier sources, SynthRoad), outlier pasting, the
accelerate loop (stage 1 closed set, stage 2 outlier exposure) and the HF Trainer route.

Installed as ``mask2anomaly_training``.
"""
