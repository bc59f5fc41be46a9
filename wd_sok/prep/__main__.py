"""``python -m wd_sok.prep ...``; see :mod:`wd_sok.prep.cli`."""

import sys

from wd_sok.prep.cli import main

sys.exit(main())
