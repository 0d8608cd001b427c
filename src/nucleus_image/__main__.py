"""`python -m nucleus_image ...` = `nucleus ...`: the form torchrun launches (`torchrun ... -m nucleus_image train ...`)."""

import sys

from nucleus_image.cli import main

sys.exit(main())
