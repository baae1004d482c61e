"""`python -m remerge`: the same as the `remerge` command."""

import sys

from remerge.cli import main

sys.exit(main())
