"""``python -m d2r.cli``: the ``d2r`` command."""
import sys

from d2r.cli import main

sys.exit(main())
