"""Test hook (PYTHONPATH=tests/cluster/hooks): with SR_TEST_SLOW_SAVE=results.json, a process about to
rename a *completed* results.json into place first touches ``.saving-results`` beside it and sleeps, so a
test can kill the job in the middle of saving its result. Inert without the variable."""

import os
import time

_target = os.environ.get("SR_TEST_SLOW_SAVE")
if _target:
    _replace = os.replace

    def _slow_replace(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) == _target:
            try:
                with open(src, "rb") as fh:
                    completed = b'"status": "completed"' in fh.read()
            except OSError:
                completed = False
            if completed:
                folder = os.path.dirname(os.fspath(dst))
                with open(os.path.join(folder, ".saving-results"), "w") as fh:
                    fh.write(str(os.getpid()))
                time.sleep(float(os.environ.get("SR_TEST_SLOW_SAVE_S", "120")))
        return _replace(src, dst, *args, **kwargs)

    os.replace = _slow_replace
