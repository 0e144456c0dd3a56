"""`python slow_cli.py ARGS` runs `sacpo ARGS` with every micro-batch slowed by SACPO_TEST_STEP_DELAY seconds
(default 0.3), so that a test can SIGKILL a training run between two checkpoints. Nothing else is changed."""

import os
import sys
import time

import sacpo.train.step as step
from sacpo.cli import main

DELAY = float(os.environ.get("SACPO_TEST_STEP_DELAY", "0.3"))
_real_call = step.BatchLoss.__call__


def _slow_call(self, model, idx, global_idx):
    time.sleep(DELAY)
    return _real_call(self, model, idx, global_idx)


step.BatchLoss.__call__ = _slow_call

if __name__ == "__main__":
    sys.exit(main())
