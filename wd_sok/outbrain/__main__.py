"""``python -m wd_sok.outbrain INPUT_DIR OUTPUT_DIR [options]``; see :mod:`wd_sok.outbrain.cli`."""

import sys

from wd_sok.outbrain.cli import main

sys.exit(main())
