"""``python -m bench [flags]``: run the benchmark (bench/README.md says what it measures and how to read it)."""

import sys

from bench.runner import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
