"""``python -m popcomp``: the same command line as the ``popcomp`` script."""
import sys

from .cli import main

sys.exit(main())
