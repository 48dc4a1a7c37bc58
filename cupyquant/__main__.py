"""``python -m cupyquant``: the ``cupyquant`` command."""

import sys

from .cli import main

sys.exit(main())
