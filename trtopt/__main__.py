"""``python -m trtopt``: the ``trtopt`` command line."""

import sys

from .cli import main

if __name__ == "__main__":  # importing this module (e.g. walking the package) must not run the CLI
    sys.exit(main())
