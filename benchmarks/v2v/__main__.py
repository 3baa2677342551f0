import sys

from benchmarks.v2v.cli import main

sys.exit(main())
