"""``python -m ecg_pipeline``: the ``ecg-pipeline`` command line."""

import sys

from ecg_pipeline.jobs.cli import main

sys.exit(main())
