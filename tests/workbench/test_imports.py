"""The architecture, checked: the library imports neither matplotlib nor flax."""

import subprocess
import sys


def test_importing_the_library_needs_neither_matplotlib_nor_flax():
    code = "import sys, curvature; assert not {'matplotlib', 'flax', 'optax'} & set(sys.modules), sorted(sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode
        == 0
    )
