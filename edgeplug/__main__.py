"""`python -m edgeplug`: the `edgeplug` command line."""

import sys

from edgeplug.cli import main

sys.exit(main())
