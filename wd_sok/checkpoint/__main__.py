"""``python -m wd_sok.checkpoint convert MODEL_DIR``: see :mod:`wd_sok.checkpoint.convert`."""

import sys

from wd_sok.checkpoint.convert import main

sys.exit(main())
