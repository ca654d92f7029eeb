"""``python -m pipeline``: the same as the ``n2n`` console script."""

import sys

from pipeline.cli.main import main

sys.exit(main())
