"""`python -m hakit` is the `hakit` command."""

import sys

from hakit.cli import main

sys.exit(main())
