"""``python -m wd_sok.checkpoint convert MODEL_DIR`` (:mod:`wd_sok.checkpoint.convert`) or
``python -m wd_sok.checkpoint inspect PATH`` (:mod:`wd_sok.checkpoint.inspect`)."""

import sys

if sys.argv[1:2] == ["inspect"]:
    from wd_sok.checkpoint.inspect import main

    sys.exit(main(sys.argv[2:]))

from wd_sok.checkpoint.convert import main  # noqa: E402

sys.exit(main())
