"""Run SAMSegment's self-test inside real 3D Slicer (5.10 or later) and exit with its status.

On a Linux machine without a display (Slicer's --no-main-window still creates a GUI application):

    xvfb-run --auto-servernum Slicer --testing --no-splash --no-main-window \
      --additional-module-paths SAMSegment \
      --python-code "exec(open('Testing/SAMSegmentSlicer/slicer_selftest.py').read())"

(run from the repository root; drop ``xvfb-run --auto-servernum`` where there is a display).
``--testing`` makes Slicer's confirmation dialogs answer yes, so missing Python packages are
installed; where that is impossible the test is skipped with the reason. Exit status: 0 passed,
1 failed, 77 skipped (CTest's usual SKIP_RETURN_CODE). The same test also runs from the module's
"Reload and Test" button and as the CTest test registered by slicer_add_python_unittest.
"""

import sys
import traceback
import unittest

import slicer

status = 1
try:
    import SAMSegment

    result = unittest.TextTestRunner(verbosity=2).run(SAMSegment.SAMSegmentTest())
    if not result.wasSuccessful():
        print("SAMSegment self-test FAILED", file=sys.stderr)
    elif result.skipped:
        status = 77
        print("SAMSegment self-test SKIPPED: " + "; ".join(reason for _test, reason in result.skipped))
    else:
        status = 0
        print("SAMSegment self-test passed")
except Exception:  # noqa: BLE001 - reported and turned into the exit status
    traceback.print_exc()
    print("SAMSegment self-test FAILED", file=sys.stderr)
slicer.util.exit(status)
