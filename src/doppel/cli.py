"""What the command-line scripts share (train.py, eval.py, embed.py, export.py): a mistake in the settings or the
data ends the command with its one sentence on stderr and exit status 1, not a traceback; ``DOPPEL_TRACEBACK=1``
(or Hydra's ``HYDRA_FULL_ERROR=1``) shows the traceback as well.

Hydra composes the config before any of our code runs, so an override of a key that does not exist
(``optim.learning_rate=0.1``) is checked here first, with the keys that do exist and a "did you mean".
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A user's mistake: bad settings, missing or unreadable files, data or checkpoints that cannot be used, a run
# that diverged, a missing optional package. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError, ImportError)


def traceback_wanted() -> bool:
    return os.environ.get("DOPPEL_TRACEBACK") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"


def reported(function: Callable[..., Any], *args: Any, extra: tuple[type[BaseException], ...] = ()) -> Any:
    """``function(*args)``; a user's mistake is printed as ``Error: <sentence>`` and exits 1."""
    try:
        return function(*args)
    except USER_ERRORS + extra as error:
        if traceback_wanted():
            raise
        print(f"Error: {error}", file=sys.stderr, flush=True)
        _remove_empty_run_dir()
        sys.exit(1)


def _remove_empty_run_dir() -> None:
    """A command that failed before writing anything leaves no run folder behind (only Hydra's own files)."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    hydra_own = {".hydra", f"{HydraConfig.get().job.name}.log"}
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= hydra_own:
        shutil.rmtree(folder, ignore_errors=True)


def check_overrides(config_name: str, argv: list[str]) -> None:
    """Before Hydra: each ``key=value`` of the command line whose key is not in the composed config (and is not
    added with ``+``) ends the command with the keys its parent has and the nearest one."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from doppel.config import CONFIG_DIR, _unknown

    words = [w for w in argv if "=" in w and not w.startswith("-")]
    dotted = [w.split("=", 1)[0] for w in words if w[0] not in "+~" and "." in w.split("=", 1)[0]
              and not w.startswith("hydra.")]
    if not dotted:
        return
    # group choices only (a sweep's first choice): what the dotted keys are looked up in
    choices = [f"{w.split('=', 1)[0]}={w.split('=', 1)[1].split(',')[0]}" for w in words
               if w[0] not in "+~" and "." not in w.split("=", 1)[0] and (CONFIG_DIR / w.split("=", 1)[0]).is_dir()
               and "[" not in w]
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=choices)
    except Exception:  # a wrong group choice: Hydra's own message lists the choices
        return
    missing = "???"
    for key in dotted:
        if OmegaConf.select(cfg, key, default=missing) is not missing:
            continue
        parent_key, _, _ = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, default=None)
        if OmegaConf.is_dict(parent) and OmegaConf.is_struct(parent):  # what Hydra would refuse
            known = [str(k) for k in parent.keys() if not str(k).startswith("_")]
            print(f"Error: {_unknown(key, known, parent_key)}", file=sys.stderr, flush=True)
            sys.exit(1)
