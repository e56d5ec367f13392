"""``python -m pipelines.tune --job JSON``: one tuning worker (a subprocess of ``mlops tune``, or
a pod); the storage URL comes from ``MLOPS__TUNING__STORAGE``, never from the arguments."""

import sys

from pipelines.tune.worker import main

sys.exit(main())
