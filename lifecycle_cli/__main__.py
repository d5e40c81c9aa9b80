"""`python -m lifecycle_cli` is `llmcycle`."""

import sys

from lifecycle_cli.cli import main

sys.exit(main())
