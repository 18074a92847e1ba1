"""Every row of the table in docs/reliability.md is a test: it is read from the document and run here."""

import importlib
import re
import shlex
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
from omegaconf import open_dict

import doppel.data.datamodule as datamodule
from doppel.train import train
from tests.conftest import TINY, compose_cfg
from tests.e2e.reliability_files import write_files

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
# The small run the rows' commands are added to (and that wrote last.ckpt): 2 epochs of 3 steps.
BASE = [*TINY, "trainer.max_epochs=2", "trainer.limit_train_batches=3"]
ROW = re.compile(r"^\| (\d+) \| (.+?) \| (.+?) \| (.+?) \| (start|data|run) \| (.+?) \|$")


class Row(NamedTuple):
    number: int
    fault: str
    command: str
    outcome: str
    when: str
    test: str


ROWS = [Row(int(m[1]), *m.groups()[1:]) for m in map(ROW.match, DOC.read_text().splitlines()) if m]
HERE = [row for row in ROWS if row.test == "this table"]


def test_the_table_has_at_least_30_rows_in_order():
    assert len(ROWS) >= 30 and [row.number for row in ROWS] == list(range(1, len(ROWS) + 1))
    assert len(HERE) >= 30


@pytest.mark.parametrize("row", [row for row in ROWS if row.test != "this table"], ids=lambda row: f"row{row.number}")
def test_a_row_covered_elsewhere_names_a_test_that_exists(row):
    file, name = row.test.split("::")
    folder = next(p.parent for p in Path(__file__).resolve().parents[1].rglob(file))
    module = importlib.import_module(".".join(folder.relative_to(DOC.parents[1]).parts + (Path(file).stem,)))
    assert callable(getattr(module, name, None)), row.test


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    write_files(folder)
    return folder


@pytest.mark.parametrize("row", HERE, ids=lambda row: f"row{row.number}")
def test_row(row, files, tmp_path, monkeypatch):
    monkeypatch.chdir(files)  # the commands name their files relative to the run's folder
    loaded = []
    real = datamodule.IdentityDataModule.setup
    monkeypatch.setattr(datamodule.IdentityDataModule, "setup",
                        lambda self, *a, **k: loaded.append(1) or real(self, *a, **k))
    words = shlex.split(row.command.strip("`"))
    assert words[:2] == ["python", "train.py"], row.command
    overrides = [w for w in words[2:] if not w.startswith("hydra.run.dir=")]
    own_backbone = any(w.startswith("backbone=") for w in overrides)
    base = [o for o in BASE if not (own_backbone and o.startswith("backbone."))]
    cfg = compose_cfg(tmp_path, [*base, *overrides], tiny_backbone=False)
    for word in words[2:]:
        if word.startswith("hydra.run.dir="):
            with open_dict(cfg):
                cfg.paths.output_dir = word.split("=", 1)[1]
    if row.outcome == "trains":
        train(cfg)
    else:
        kind, message = row.outcome.strip("`").split(": ", 1)
        with pytest.raises(Exception) as error, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. resuming with changed settings warns before the error
            train(cfg)
        assert type(error.value).__name__ == kind, error.value
        pattern = ".*".join(re.escape(part) for part in message.split("…"))
        assert re.fullmatch(pattern, str(error.value), flags=re.DOTALL), str(error.value)
    assert bool(loaded) == (row.when != "start"), "start: before any data is read"
