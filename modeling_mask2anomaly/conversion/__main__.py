"""`python -m modeling_mask2anomaly.conversion` is `mask2anomaly-convert`."""

import sys

from .cli import main

sys.exit(main())
