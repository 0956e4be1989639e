"""``python -m genrec``: the ``genrec`` command (so ``torchrun -m genrec train ...`` starts it in every process)."""

import sys

from genrec.cli import main

if __name__ == "__main__":
    sys.exit(main())
