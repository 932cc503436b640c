"""`python -m framepack` is the same as the `framepack` command."""

import sys

from framepack.cli import main

sys.exit(main())
