"""`python -m remap_cli ...` is the `remap` command."""

import sys

from remap_cli import main

sys.exit(main())
