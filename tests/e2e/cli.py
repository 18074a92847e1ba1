"""Running ``python train.py`` (or ``eval.py``) as a user does, in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(args, cwd, env=None, timeout=600, script="train.py") -> subprocess.CompletedProcess:
    # No WANDB_ variables and no key: logger=wandb must be offline by its own config.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    environment["PYTHONPATH"] = str(ROOT)  # tests/ holds the fault-injection callbacks
    environment.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)
