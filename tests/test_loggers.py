"""The resumable CSV logger: process 0 alone rewrites ``metrics.csv``."""

from pytorch_lightning.utilities import rank_zero_only

from doppel.loggers import CSVLogger

ROWS = "epoch,loss,step\n" + "".join(f"0,{0.5 + s},{s}\n" for s in range(8))


def resumed_logger(tmp_path, step):
    logger = CSVLogger(save_dir=tmp_path, name="csv", version="")
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(ROWS)
    logger.resume_before(step)
    return logger


def test_process_zero_keeps_the_rows_before_the_checkpoint_step(tmp_path):
    _ = resumed_logger(tmp_path, 5).experiment  # Lightning reads it before its first barrier
    assert (tmp_path / "csv" / "metrics.csv").read_text() == "".join(ROWS.splitlines(True)[:6])


def test_other_processes_leave_the_file_to_process_zero(tmp_path, monkeypatch):
    # Two processes rewriting one file race: the other one read it while process 0 had removed it.
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    _ = resumed_logger(tmp_path, 5).experiment  # Lightning reads it before its first barrier
    assert (tmp_path / "csv" / "metrics.csv").read_text() == ROWS
