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


def test_tensorboard_gets_the_scalars_pictures_histograms_and_tables_wandb_gets(tmp_path):
    """logger=[csv,tensorboard]: every CSV scalar at the same steps and values, the run directory's pictures
    byte for byte, the norm histogram's counts, the doppelganger table, the protocol's curve."""
    import csv
    import io
    import json

    import numpy as np
    import pytest
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from doppel.train import train
    from tests.conftest import compose_cfg

    train(compose_cfg(tmp_path, ["logger=[csv,tensorboard]", "trainer.max_epochs=1", "trainer.limit_train_batches=3"],
                      pictures=True))
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0,
                                                                           "histograms": 0, "tensors": 0})
    events.Reload()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    names = [name for name in rows[0] if name != "step"]
    assert {"train/loss/l2s", "train/lr", "val/novel/top1", "doppel/table_filled"} <= set(names)
    for name in names:
        written = [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert written and [s for s, _ in logged] == [s for s, _ in written], name
        assert [v for _, v in logged] == pytest.approx([v for _, v in written], rel=1e-6), name

    def picture(tag):
        (image,) = events.Images(tag)
        return Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB").tobytes()

    for tag, path in (("diagnostics/norms", "diagnostics/norms.png"),
                      ("diagnostics/gallery", "diagnostics/gallery_e000.png"),
                      ("eval/precision_coverage", "precision_coverage.png")):
        with Image.open(tmp_path / path) as written:
            assert picture(tag) == written.convert("RGB").tobytes(), tag
    from doppel.run_logs import read_csv_log, read_tensorboard_log

    read_back = {(r["step"], k): v for r in read_tensorboard_log(tmp_path) for k, v in r.items() if k != "step"}
    written = {(r["step"], k): v for r in read_csv_log(tmp_path) for k, v in r.items() if k != "step"}
    assert read_back.keys() == written.keys() and len(written) > 20  # the report's curves without a CSV
    assert [read_back[k] for k in written] == pytest.approx(list(written.values()), rel=1e-6)
    (histogram,) = events.Histograms("embedding/norm_histogram")
    written = json.loads((tmp_path / "diagnostics" / "norms.json").read_text())[-1]
    assert histogram.histogram_value.bucket == written["counts"]
    np.testing.assert_allclose(histogram.histogram_value.bucket_limit, written["edges"][1:])
    table = events.Tensors("diagnostics/doppelgangers/text_summary")[0].tensor_proto.string_val[0].decode()
    gallery = json.loads((tmp_path / "diagnostics" / "gallery_e000.json").read_text())
    pairs = [(r["name"], d["name"]) for r in gallery for d in r["doppelgangers"]]
    lines = table.splitlines()[2:]  # after the header and the rule: one line per pair, in order
    assert len(lines) == len(pairs) and all(a in line and b in line for (a, b), line in zip(pairs, lines))
