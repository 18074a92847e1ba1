"""SLURM: requeue the job that a time-limit warning stopped (``scontrol requeue``), so that it resumes from
``last.ckpt`` with ``ckpt_path=auto`` (docs/distributed.md, "Clusters").

SLURM sends the warning signal a job asks for (``#SBATCH --signal=USR1@90``; submitit, and so
``hydra/launcher=slurm``, asks for USR2) before its time limit, and SIGTERM when the job is preempted (a
partition with ``PreemptMode=REQUEUE`` requeues it itself).
"""

from __future__ import annotations

import os
import signal
import subprocess

# The signals after which a run under SLURM asks to be requeued once it has saved.
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def job_id(environ: os._Environ | dict[str, str] = os.environ) -> str | None:
    """This job's id as ``scontrol`` names it (an array task: ``<array job>_<task>``); None outside SLURM."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID") or None


def requeue() -> str:
    """Ask SLURM to requeue this job; a sentence saying what happened (for the log)."""
    job = job_id()
    if job is None:
        return "not a SLURM job (no SLURM_JOB_ID): nothing to requeue; resume with ckpt_path=auto."
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"scontrol requeue {job} failed ({error}): resume by hand with ckpt_path=auto."
    if result.returncode != 0:
        return f"scontrol requeue {job} failed ({result.stderr.strip()}): resume by hand with ckpt_path=auto."
    return f"SLURM job {job} requeued: it resumes from the checkpoint with ckpt_path=auto."
