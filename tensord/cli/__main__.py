"""``python -m tensord.cli``, as ``python -m tensord`` and the ``tensord`` script."""

import sys

from . import main

sys.exit(main())
