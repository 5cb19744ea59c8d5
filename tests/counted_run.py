"""`python tests/counted_run.py COUNTS.json script.py args...` runs `script.py args...` as `python script.py
args...` would, and writes {"passes": n, "seconds": t} to COUNTS.json when it exits normally: n counts every
gradient computation (tests.helpers.counting_gradient_passes), t the wall time from interpreter start. Launched
on several processes (`accelerate launch ... tests/counted_run.py ...`), each writes COUNTS.json.rank<RANK>.

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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        counts_path = f"{counts_path}.rank{os.environ['RANK']}"
    if os.environ.get("ROSE_TEST_SLOW_STEPS"):
        import transformers

        transformers.Trainer.training_step = _slowed(
            transformers.Trainer.training_step, float(os.environ["ROSE_TEST_SLOW_STEPS"])
        )
    if os.environ.get("ROSE_TEST_SLOW_WRITES"):
        from rose_trl.stores.store import GradientStore

        GradientStore.write = _slowed(GradientStore.write, float(os.environ["ROSE_TEST_SLOW_WRITES"]))
    # The context manager must outlive this function: collected, its generator would close and put the real
    # torch.autograd functions back at once (counting nothing). It is closed at exit, before the counts are written.
    manager = counting_gradient_passes()
    counter = manager.__enter__()

    def write_counts():
        manager.__exit__(None, None, None)
        with open(counts_path, "w") as f:
            f.write(json.dumps({**counter, "seconds": time.time() - START}))

    atexit.register(write_counts)
    sys.argv = sys.argv[2:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
