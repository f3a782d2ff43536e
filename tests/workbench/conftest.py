"""The workbench tests leave the user's compilation cache alone: ``experiments.run``, in this
process and in the command lines it starts, finds its persistent compilation cache turned off
(``experiments.compilation_cache.ENV``; not imported here, so that the suite collects without
the experiments' dependencies). In this process it keeps the temporary directory that
``tests/conftest.py`` gives each test process, as it keeps any directory a process chose; the
test of the cache points it at a temporary directory of its own."""

import os

os.environ["CURVATURE_JAX_CACHE"] = "off"
