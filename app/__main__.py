"""`python -m app`: the same CLI as the `tokentape` console script."""

import sys

from app.cli import main

sys.exit(main())
