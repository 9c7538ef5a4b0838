"""``python -m engine`` is the ``recstream`` command."""

import sys

from ._cli import main

sys.exit(main())
