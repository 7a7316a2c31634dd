"""``python -m sqla_rebalance.devservers KIND``: start servers, keep them up until interrupted."""

import sys

from ._cli import main

sys.exit(main())
