"""``python -m wd_sok.checkpoint convert MODEL_DIR`` (:mod:`wd_sok.checkpoint.convert`),
``python -m wd_sok.checkpoint inspect PATH`` (:mod:`wd_sok.checkpoint.inspect`) or
``python -m wd_sok.checkpoint consolidate PATH [--output OUT]`` (:mod:`wd_sok.checkpoint.consolidate`)."""

import sys

if sys.argv[1:2] == ["inspect"]:
    from wd_sok.checkpoint.inspect import main

    sys.exit(main(sys.argv[2:]))

if sys.argv[1:2] == ["consolidate"]:
    from wd_sok.checkpoint.consolidate import main

    sys.exit(main(sys.argv[2:]))

from wd_sok.checkpoint.convert import main  # noqa: E402

sys.exit(main())
