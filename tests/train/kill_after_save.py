"""`python kill_after_save.py ARGS` runs `sacpo ARGS` (under `accelerate launch`: in every process), and each
process SIGKILLs itself right after the checkpoint of step SACPO_TEST_KILL_AFTER_SAVE is complete: a crash at a
known point, with no timing involved. Test-only; nothing else is changed."""

import os
import signal
import sys

import sacpo.train.epochs as epochs
from sacpo.cli import main

KILL_AT = int(os.environ["SACPO_TEST_KILL_AFTER_SAVE"])
_real_save = epochs.checkpoint.save


def _save_then_die(acc, out, step, *args, **kwargs):
    _real_save(acc, out, step, *args, **kwargs)
    if step == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


epochs.checkpoint.save = _save_then_die

if __name__ == "__main__":
    sys.exit(main())
