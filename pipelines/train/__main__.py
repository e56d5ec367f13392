"""``python -m pipelines.train``: the per-node entrypoint that torchrun starts."""

import sys

from pipelines.train.worker import main

sys.exit(main())
