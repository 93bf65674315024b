"""`python -m monoroute.toy abs --quick --json`: the toy lab without the top-level CLI."""
import sys

from monoroute.toy.cli import main

sys.exit(main())
