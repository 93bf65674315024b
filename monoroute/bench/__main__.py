"""`python -m monoroute.bench layer --quick --json`: the bench commands without the main CLI."""
import sys

from monoroute.bench.cli import main

sys.exit(main())
