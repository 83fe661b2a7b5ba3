"""Run SAMSegment's self-test inside real Slicer and exit with its status (0 = passed).

    Slicer --no-splash --no-main-window --additional-module-paths SAMSegment \
      --python-code "exec(open('Testing/SAMSegmentSlicer/slicer_selftest.py').read())"

(run from the repository root; the same test also runs from the module's "Reload and Test" button
and as the CTest test registered by slicer_add_python_unittest.)
"""

import sys
import traceback

import slicer

status = 1
try:
    import SAMSegment

    SAMSegment.SAMSegmentTest().runTest()
    status = 0
    print("SAMSegment self-test passed")
except Exception:  # noqa: BLE001 - reported and turned into the exit status
    traceback.print_exc()
    print("SAMSegment self-test FAILED", file=sys.stderr)
slicer.util.exit(status)
