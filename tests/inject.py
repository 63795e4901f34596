"""Run a method script with a fault injected (tests only; production code has no hooks).

    python tests/inject.py FAULT SCRIPT [ARGS...]

FAULT: raise@rank1:step2 | nan@step3 | cfg@rank1 | none
"""

import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import train  # noqa: E402

fault, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
rank = int(os.environ.get("RANK", "0"))

if fault == "raise@rank1:step2":
    step_done = train.TrainRun.step_done

    def failing_step_done(self, loss, **metrics):
        if rank == 1 and self.step == 2:
            raise RuntimeError("injected failure on rank 1")
        return step_done(self, loss, **metrics)

    train.TrainRun.step_done = failing_step_done
elif fault == "nan@step3":
    nonfinite = train.TrainRun.nonfinite

    def nan_at_step3(self, loss):
        return nonfinite(self, loss * float("nan") if self.step == 3 else loss)

    train.TrainRun.nonfinite = nan_at_step3
elif fault == "cfg@rank1":
    if rank == 1:
        args += ["--lr", "0.123"]
elif fault != "none":
    raise SystemExit(f"unknown fault {fault}")

sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
