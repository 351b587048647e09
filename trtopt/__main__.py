"""``python -m trtopt``: the ``trtopt`` command line."""

import sys

from .cli import main

sys.exit(main())
