"""`python -m tunesmith ...`, and what launchers run: `torchrun ... -m tunesmith train CONFIG`."""
import sys

from tunesmith.cli import main

sys.exit(main())
