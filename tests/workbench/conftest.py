"""The workbench tests leave the user's compilation cache alone: ``experiments.run``, in this
process and in the command lines it starts, finds JAX's persistent compilation cache turned off
(``experiments.compilation_cache.ENV``; not imported here, so that the suite collects without
the experiments' dependencies), and the test of the cache points it at a temporary directory."""

import os

os.environ["CURVATURE_JAX_CACHE"] = "off"
