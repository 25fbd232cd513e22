"""``python -m streamexec`` is the same as the ``streamexec`` command."""

import sys

from .cli import main

sys.exit(main())
