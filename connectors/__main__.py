"""``python -m connectors`` is the ``recstream`` command."""

import sys

from .cli import main

sys.exit(main())
