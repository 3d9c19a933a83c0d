#!/usr/bin/env python
"""Run the specdec benchmark as a script: ``python bench/run.py [flags]`` = ``specdec bench [flags]``.

See bench/README.md for what it measures and how to reproduce the figure.
"""

import sys

from specdec.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
