import sys

from monoroute.cli import main

sys.exit(main())
