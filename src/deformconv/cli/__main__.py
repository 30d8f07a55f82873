"""``python -m deformconv.cli``."""

import sys

from deformconv.cli import main

sys.exit(main())
