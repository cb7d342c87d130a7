"""``python -m mask2anomaly_training.synthroad``: the same as ``mask2anomaly-synthroad``."""

from .cli import main

raise SystemExit(main())
