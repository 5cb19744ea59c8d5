"""`python tests/counted_run.py COUNTS.json script.py args...` runs `script.py args...` as `python script.py
args...` would, and writes {"passes": n, "seconds": t} to COUNTS.json when it exits normally: n counts every
gradient computation (tests.helpers.counting_gradient_passes), t the wall time from interpreter start.

With ROSE_TEST_SLOW_STEPS=<seconds> every training step, with ROSE_TEST_SLOW_WRITES=<seconds> every
gradient-store write, first sleeps that long, so that a test's SIGKILL lands inside the stage it waits for
(the numbers computed are unchanged).
"""

import atexit
import json
import os
import runpy
import sys
import time


START = time.time()


def _slowed(fn, delay):
    def wrapper(*args, **kwargs):
        time.sleep(delay)
        return fn(*args, **kwargs)

    return wrapper


def main():
    from tests.helpers import counting_gradient_passes

    counts_path, script = sys.argv[1], sys.argv[2]
    if os.environ.get("ROSE_TEST_SLOW_STEPS"):
        import transformers

        transformers.Trainer.training_step = _slowed(
            transformers.Trainer.training_step, float(os.environ["ROSE_TEST_SLOW_STEPS"])
        )
    if os.environ.get("ROSE_TEST_SLOW_WRITES"):
        from rose_trl.stores.store import GradientStore

        GradientStore.write = _slowed(GradientStore.write, float(os.environ["ROSE_TEST_SLOW_WRITES"]))
    counter = counting_gradient_passes().__enter__()
    atexit.register(lambda: open(counts_path, "w").write(json.dumps({**counter, "seconds": time.time() - START})))
    sys.argv = sys.argv[2:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
