"""The command each benchmark process runs: ``python -m optitrainer.bench._child --config C --json-out R``.

A separate module from :mod:`optitrainer.bench.runner` (which the package imports), so that
``-m`` does not execute a module that is already imported.
"""

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
