"""`python -m step3vl ...`: the same command line as the `step3vl` entry point."""

import sys

from step3vl.cli import main

sys.exit(main())
