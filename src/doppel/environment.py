"""What a run's numbers depend on besides its config: ``speed.threads`` (how many threads torch's CPU kernels
use in each process) and the machine (``environment.json`` in the run folder).

torch's default (one thread per core) collapses when two jobs share the cores: every parallel kernel waits
for the thread another job has taken (docs/benchmarks.md, "Threads"). ``auto`` leaves one core of each
process's share to the data loader and to whatever else runs beside it. The count changes the order of
floating-point sums, so a run's numbers depend on it, as on torch's version and the CPU's instruction set:
all three are printed at the start and kept in the run's ``environment.json``.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

# OMP_NUM_THREADS as the shell gave it: Lightning's DDP launch writes its own into os.environ, which a
# later job of the same multirun process must not take for the user's.
SHELL_OMP_NUM_THREADS = os.environ.get("OMP_NUM_THREADS")


def cores_available() -> int:
    """The cores this process may run on (taskset / SLURM's cpus-per-task narrow them), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def processes_per_node(trainer: Any) -> int:
    """The training processes that share this machine's cores, from ``trainer.devices``."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, int) and devices >= 1:
        return devices
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit() and int(devices) >= 1:
        return int(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if not isinstance(devices, (int, str)) and devices is not None:  # a list of GPU indices
        return max(1, len(devices))
    on_gpu = trainer.get("accelerator", "auto") in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.cuda.device_count() if on_gpu else 1  # auto / -1


def thread_count(setting: Any, trainer: Any) -> tuple[int, str]:
    """``speed.threads`` as a number, with the reason in words."""
    if isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1:
        return setting, f"speed.threads={setting}"
    if setting != "auto":
        raise ValueError(f"speed.threads={setting} must be auto or a positive integer (torch's threads per "
                         "process; auto leaves a core to the data loader).")
    shell = SHELL_OMP_NUM_THREADS or ""
    if shell.isdigit() and int(shell) >= 1:
        return int(shell), "speed.threads=auto: OMP_NUM_THREADS is set"
    cores, processes = cores_available(), processes_per_node(trainer)
    if slurm_task_per_process(processes):  # the task's cores are already this process's own
        share, why = cores, f"{cores} cores of this SLURM task"
    else:
        share, why = cores // processes, f"{cores} cores / {processes} process(es)"
    return max(1, share - 1), f"speed.threads=auto: {why}, one core left to the data loader"


def slurm_task_per_process(processes: int) -> bool:
    """Whether SLURM started each training process as its own task (srun --ntasks-per-node=devices, as
    hydra/launcher=slurm does): then the cores this process sees are its share alone."""
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]  # "8" or "8(x2)"
    return "SLURM_PROCID" in os.environ and per_node.isdigit() and int(per_node) == processes


def use_threads(cfg: Any) -> int:
    """Set torch's intra-op threads for this run, and OMP_NUM_THREADS: the processes it starts inherit it, and
    Lightning's DDP launchers, which set cores / processes where it is unset, leave it; returns the count."""
    count, why = thread_count(cfg.speed.get("threads", "auto"), cfg.trainer)
    torch.set_num_threads(count)
    os.environ["OMP_NUM_THREADS"] = str(count)
    rank_zero_info(f"torch {torch.__version__}, {count} thread(s) per process ({why}); {cpu_name()}")
    return count


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int) -> dict[str, Any]:
    """What besides the config decides a run's numbers to the last digit."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "threads": threads, "cpu": cpu_name(), "cores": cores_available(),
            "gpu": gpu, "python": platform.python_version()}


@rank_zero_only
def save_environment(output_dir: Path, threads: int) -> None:
    (output_dir / "environment.json").write_text(json.dumps(environment(threads), indent=2) + "\n")

