"""Model card template and generator. Installed as ``mask2anomaly_model_cards``."""
