"""``python -m medssl`` (also what ``torchrun -m medssl pretrain ...`` runs)."""

import sys

from medssl.cli import main

if __name__ == "__main__":
    sys.exit(main())
