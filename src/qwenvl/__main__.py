"""``python -m qwenvl ...``: the ``qwenvl`` command (handy under ``torchrun`` without ``--no-python``)."""

import sys

from .cli import main

sys.exit(main())
