"""``python -m cerulean.cli``: the same as the ``cerulean`` command."""

import sys

from cerulean.cli import main

sys.exit(main())
