"""The README's short run (section "Numbers, and what they depend on"), run exactly as written: where torch,
the thread count and the CPU are the README's, every number it prints equals the README's to the last
printed digit; anywhere else, each lies within the README's stated tolerance."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.e2e.cli import ROOT

MARKER = "<!-- checked by tests/e2e/test_readme_numbers.py -->"


def documented() -> dict:
    text = (ROOT / "README.md").read_text()
    assert text.count(MARKER) == 1, f"README.md should hold one {MARKER}"
    section = text[text.index(MARKER):]
    section = section[:section.index("\n#")] if "\n#" in section else section
    command = re.search(r"```bash\n(python train\.py[^\n]*)\n```", section).group(1)
    rows = re.findall(r"^\| `(test/[^`]+)` \| ([\d.]+) \| ±([\d.]+) \|$", section, re.M)
    machine = re.search(r"measured\s+with\s+torch\s+(\S+),\s+(\d+)\s+thread\(s\),\s+(.+?)\s+\((\d+)\s+cores\)",
                        section)
    return {"command": shlex.split(command), "numbers": {k: (float(v), float(t)) for k, v, t in rows},
            "torch": machine.group(1), "threads": int(machine.group(2)), "cpu": machine.group(3)}


def test_the_readme_states_a_command_its_numbers_and_their_tolerance():
    readme = documented()
    assert readme["command"][:2] == ["python", "train.py"]
    assert {"test/novel/top1", "test/base/top1", "test/novel/coverage@0.99"} <= set(readme["numbers"])


def test_the_readmes_short_run_prints_the_readmes_numbers(tmp_path):
    readme = documented()
    # a user's plain shell: no thread setting, no W&B variables
    environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS" and not k.startswith("WANDB_")}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *readme["command"][2:],
                             f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    ran = json.loads((tmp_path / "run" / "environment.json").read_text())
    same_machine = (ran["torch"], ran["threads"], ran["cpu"]) == (readme["torch"], readme["threads"], readme["cpu"])
    for key, (value, tolerance) in readme["numbers"].items():
        printed = round(100 * metrics[key], 2)
        if same_machine:
            assert printed == pytest.approx(value, abs=1e-9), (key, printed, value)
        else:
            assert abs(printed - value) <= tolerance, (key, printed, value, tolerance, ran)
