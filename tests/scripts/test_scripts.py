import json
import math

import pytest

from tests.conftest import ROOT, load_script


def write_sweep(root, runs):
    for i, (sampler, seed, top1) in enumerate(runs):
        job = root / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- sampler={sampler}\n- seed={seed}\n")
        (job / "metrics.json").write_text(json.dumps({"test/novel/top1": top1}))
    return root


def test_rows_group_seeds_with_t_intervals_and_paired_tests_against_a_baseline(tmp_path):
    summarize_sweep = load_script("summarize_sweep")
    random = write_sweep(tmp_path / "a", [("random", 0, 0.10), ("random", 1, 0.20), ("random", 2, 0.30)])
    doppel = write_sweep(tmp_path / "b", [("doppel", 0, 0.5), ("doppel", 1, 0.7)])
    table = summarize_sweep.summarize(summarize_sweep.load_jobs(random, doppel), None, ["test/novel/top1"],
                                      baseline="sampler=random")
    lines = table.splitlines()
    # t(0.975, 2) = 4.302653 (tables); 10 / sqrt(3) * 4.302653 = 24.84
    assert lines[2] == "| sampler=random | 3 | 20.00 ± 24.84 |"
    # t(0.975, 1) = 12.706205; 14.142 / sqrt(2) * 12.706205 = 127.06
    assert lines[3] == "| sampler=doppel | 2 | **60.00 ± 127.06** |"  # the best mean of the column
    # pairs (seeds 0, 1): differences 40, 50: mean 45, sd 7.071, t = 9 with 1 degree of freedom, whose
    # distribution is Cauchy's: p = 1 - 2 atan(9) / pi
    p = 1 - 2 * math.atan(9) / math.pi
    half = 12.706205 * math.sqrt(50) / math.sqrt(2)
    assert lines[-3] == f"| sampler=doppel | 2 | +45.00 ± {half:.2f} (p={p:.3f}) |"


def test_metrics_an_eval_of_the_checkpoint_added_join_the_runs_own(tmp_path):
    summarize_sweep = load_script("summarize_sweep")
    sweep = write_sweep(tmp_path / "a", [("random", 0, 0.10), ("random", 1, 0.20)])
    job = sorted(sweep.glob("*/metrics.json"))[0].parent
    (job / "eval_metrics.json").write_text(json.dumps({"test/novel/top1": 0.99, "test/novel/coverage@0.97": 0.4}))
    metrics = {path.name: m for _, m, path in summarize_sweep.load_jobs(sweep)}
    assert metrics[job.name]["test/novel/coverage@0.97"] == 0.4
    assert metrics[job.name]["test/novel/top1"] == 0.10  # the run's own number, not the evaluation's


def test_a_p_value_below_one_in_a_thousand_is_printed_as_such(tmp_path):
    summarize_sweep = load_script("summarize_sweep")
    random = write_sweep(tmp_path / "a", [("random", seed, 0.10) for seed in range(3)])
    doppel = write_sweep(tmp_path / "b", [("doppel", 0, 0.50), ("doppel", 1, 0.51), ("doppel", 2, 0.50)])
    table = summarize_sweep.summarize(summarize_sweep.load_jobs(random, doppel), None, ["test/novel/top1"],
                                      baseline="sampler=random")
    # differences 40, 41, 40: mean 40.33, sd 0.577, t = 121 with 2 degrees of freedom: p = 6.8e-5
    half = 4.302653 * math.sqrt(1 / 3) / math.sqrt(3)
    assert table.splitlines()[-3] == f"| sampler=doppel | 3 | +40.33 ± {half:.2f} (p<0.001) |"


def test_a_logged_series_is_tabulated_per_epoch_over_seeds(tmp_path):
    summarize_sweep = load_script("summarize_sweep")
    sweep = write_sweep(tmp_path, [("doppel", 0, 0.5), ("doppel", 1, 0.7)])
    for job, shares in (("0", (0.1, 0.3)), ("1", (0.2, 0.5))):
        (sweep / job / "csv").mkdir()
        lines = ["doppel/lookalike_share,epoch,step,train/loss", ",0,9,1.5"]  # a step row without the key
        lines += [f"{share},{epoch},{10 * (epoch + 1)}," for epoch, share in enumerate(shares)]
        (sweep / job / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    table = summarize_sweep.series_table(summarize_sweep.load_jobs(sweep), None, "doppel/lookalike_share")
    # the CSV's epoch 0 is the first epoch: after it 0.1, 0.2 -> 0.15 ± 12.706 * 0.0707 / sqrt(2) = 0.64;
    # after the second 0.3, 0.5 -> 0.4 ± 1.3
    assert table.splitlines()[-3:] == ["| setting | epoch 1 | epoch 2 |", "|---|---|---|",
                                       "| sampler=doppel | 0.15 ± 0.64 | 0.4 ± 1.3 |"]
    assert table.splitlines()[0] == ("doppel/lookalike_share after each epoch "
                                     "(mean ± half width of the 95% t-interval over seeds, as logged):")


def write_logged_epochs(job_dir, key, values):
    (job_dir / "csv").mkdir()
    lines = [f"{key},epoch,step"] + [f"{value},{epoch},{epoch + 1}" for epoch, value in enumerate(values)]
    (job_dir / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_a_series_shows_the_chosen_epochs_and_a_dash_where_a_row_stopped_earlier(tmp_path, capsys, monkeypatch):
    summarize_sweep = load_script("summarize_sweep")
    long = write_sweep(tmp_path / "long", [("random", 0, 0.5)])
    short = write_sweep(tmp_path / "short", [("doppel", 0, 0.4)])
    write_logged_epochs(long / "0", "sampler/exposure_cv", [0.9, 0.8, 0.7, 0.6])
    write_logged_epochs(short / "0", "sampler/exposure_cv", [2.0, 1.5])
    jobs = summarize_sweep.load_jobs(long, short)
    table = summarize_sweep.series_table(jobs, None, "sampler/exposure_cv", [4, 1])
    assert table.splitlines()[-4:] == ["| setting | epoch 1 | epoch 4 |", "|---|---|---|",
                                       "| sampler=random | 0.9 | 0.6 |", "| sampler=doppel | 2 | - |"]
    assert table.splitlines()[0] == "sampler/exposure_cv after each epoch (one run per row, as logged):"
    with pytest.raises(SystemExit, match=r"--epochs 5: no run logged sampler/exposure_cv after that epoch "
                                         r"\(logged after epochs 1 2 3 4\)"):
        summarize_sweep.series_table(jobs, None, "sampler/exposure_cv", [2, 5])
    monkeypatch.setattr("sys.argv", ["summarize_sweep.py", str(long), str(short), "--series", "sampler/exposure_cv",
                                     "--epochs", "2", "3"])
    summarize_sweep.main()
    assert capsys.readouterr().out.splitlines()[-4:] == [
        "| setting | epoch 2 | epoch 3 |", "|---|---|---|",
        "| sampler=random | 0.8 | 0.7 |", "| sampler=doppel | 1.5 | - |"]


def test_overhead_benchmark_runs_both_samplers_and_mines():
    bench = load_script("bench/doppel_overhead")
    import torch

    result = bench.measure(num_classes=60, steps=2, block=1, device=torch.device("cpu"))
    assert result["random_ms"] > 0 and result["doppel_ms"] > 0
    assert result["filled"] > 0.3  # the doppel steps mined the table


def test_thread_benchmark_runs_jobs_side_by_side_each_with_its_threads(monkeypatch):
    """scripts/bench/threads.py: every measuring process runs the default run's model and class count with
    the threads asked for, whatever OMP_NUM_THREADS the shell has."""
    bench = load_script("bench/threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    results = bench.measure(threads=2, jobs=2, steps=1, warmup=0)
    assert [r["threads"] for r in results] == [2, 2]
    assert [r["classes"] for r in results] == [1266, 1266]  # the CJK set's base characters
    assert all(r["median_s"] > 0 for r in results)


def test_scale_benchmark_holds_one_share_of_the_classifier_per_process_when_sharded(tmp_path):
    """Tiny: 2 processes, 1,001 classes (rows 501 / 500). The full classifier's bytes per process are the
    whole matrix's weights + gradient + momentum; sharded, process 0's share of them."""
    import subprocess
    import sys

    out = tmp_path / "scale.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "scale.py"), "--classes", "1001",
                             "--steps", "1", "--batch", "8", "--dim", "16", "--repeats", "1", "--json", str(out),
                             "--settings", "full", "sharded", "sharded_pfc0.1_doppel"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["1001"]
    assert rows["full"]["classifier_bytes"] == 3 * 1001 * 16 * 4
    assert rows["sharded"]["classifier_bytes"] == rows["sharded_pfc0.1_doppel"]["classifier_bytes"] == 3 * 501 * 16 * 4
    assert all(r["ms"] > 0 for r in rows.values())


def test_the_sampler_section_times_every_sampler_and_the_balanced_draw_against_multinomial(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "sampler.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "scale.py"), "--section", "sampler",
                             "--classes", "300", "--images-per-class", "3", "--world", "2", "--batch", "8",
                             "--steps", "2", "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert list(rows) == ["random", "doppel", "doppel_balanced", "doppel_balanced_multinomial"]
    assert all(row["ms_per_step"] > 0 for row in rows.values())
    assert "doppel_balanced (Fenwick) / multinomial" in result.stdout


def test_the_index_section_writes_recordio_bytes_and_starts_ranks_on_the_built_cache(tmp_path):
    """The synthetic pack is byte for byte what write_recordio writes with the same 4-byte payloads; the first
    start builds the cache and the ranks that start together on it see the same training set."""
    import subprocess
    import sys

    from doppel.data.readers.recordio import write_recordio

    scale = load_script("bench/scale")
    scale.write_header_pack(tmp_path / "fast.rec", 37, 3)
    write_recordio(tmp_path / "slow.rec", ((c, [b"\xff\xd8\xff\xd9"] * 3) for c in range(37)))
    for suffix in (".rec", ".idx"):
        assert (tmp_path / f"fast{suffix}").read_bytes() == (tmp_path / f"slow{suffix}").read_bytes()

    out = tmp_path / "index.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "scale.py"), "--section", "index",
                             "--folder", str(tmp_path / "pack"), "--classes", "400", "--images-per-class", "3",
                             "--ranks", "2", "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    first, together = rows["first start (builds the cache)"], rows["2 ranks together on the cache"]
    assert (tmp_path / "pack" / "train.idx.doppel-cache" / "labels.npy").exists()
    assert [r["rank"] for r in together] == [0, 1]
    assert {(r["images"], r["classes"]) for r in first + together} == {(first[0]["images"], first[0]["classes"])}
    assert 380 < first[0]["classes"] < 400 and first[0]["images"] == 3 * first[0]["classes"]
    assert "start on the cache / first start" in result.stdout


def test_the_eval_section_gets_one_process_recall_from_two_and_a_sparse_clustering_table(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "scale.py"), "--section", "eval",
                             "--queries", "3000", "--dim", "16", "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert list(rows) == ["1 process", "2 processes"]
    assert rows["1 process"]["recall@1"] == rows["2 processes"]["recall@1"] > 0
    assert rows["1 process"]["nmi"] == rows["2 processes"]["nmi"] > 0


def test_the_checkpoint_section_writes_each_process_share_and_reads_back_the_gathered_classifier(tmp_path):
    """Gathered, process 0's file holds the whole classifier and its momentum; per process, last.ckpt holds
    none of it and each process's file its half (the arithmetic: rows x dim x 4 bytes, twice)."""
    import subprocess
    import sys

    out = tmp_path / "checkpoint.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "scale.py"), "--section", "checkpoint",
                             "--classes", "3001", "--dim", "32", "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "every process's rows read back as saved: True" in result.stdout
    rows = json.loads(out.read_text())
    whole, half = 2 * 3001 * 32 * 4 / 2**20, 2 * 1501 * 32 * 4 / 2**20
    assert rows["per process"]["classifier_bytes"] == rows["gathered"]["classifier_bytes"] == 2 * 1501 * 32 * 4
    assert whole <= rows["gathered"]["file_mb"] < whole + 0.1
    assert rows["per process"]["file_mb"] < 0.1
    assert half <= rows["per process"]["largest_shard_mb"] < half + 0.01


def test_the_ijb_benchmark_reads_a_release_of_the_given_size_and_scores_it():
    """scripts/bench/ijb.py, small: the release it writes is read back at its size and scored in full."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "ijb.py"), "--faces", "3000",
                             "--templates", "300", "--pairs", "5000", "--gallery", "40", "--probes", "100",
                             "--dim", "16"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("3,000 faces, 300 templates, 5,000 pairs, 1:N 40 gallery x 100 probes, dimension 16"
            in result.stdout)
    assert "tpir@fpir=0.1" in result.stdout and "score 1:1 and 1:N:" in result.stdout


def test_the_device_check_runs_its_settings_on_the_cpu_without_a_host_sync(tmp_path):
    """scripts/bench/gpu.py, tiny on the CPU: each setting runs its steps (the decode setting decodes JPEG
    bytes in the step) and counts no host sync in a steady-state step."""
    import subprocess
    import sys

    out = tmp_path / "gpu.json"
    tiny = json.dumps({"stem_channels": 8, "widths": [8, 16, 16, 16], "depths": [1, 1, 1, 1], "embedding_dim": 16})
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "gpu.py"), "--device", "cpu",
                             "--backbone", "face_resnet", "--options", tiny, "--image-size", "259", "--batch", "8",
                             "--classes", "64", "--large-classes", "96", "--steps", "1", "--warmup", "1",
                             "--sync-steps", "2", "--precision", "fp32", "--json", str(out),
                             "--settings", "pfc0.1_100k,no_table,full_100k,decode_gpu"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "CPU" and list(report["rows"]) == ["pfc0.1_100k", "no_table", "full_100k", "decode_gpu"]
    for name, row in report["rows"].items():
        assert row["syncs_per_step"] == 0 and row["images_per_s"] > 0, name
    assert "decode_gpu" in result.stdout and "syncs/step" in result.stdout


def test_backbone_benchmark_steps_train_the_network_in_each_setting():
    bench = load_script("bench/backbones")
    import torch

    device = torch.device("cpu")
    for setting in ("fp32", "channels_last", "bf16+cl"):
        torch.manual_seed(0)
        net = bench.build("ie_cnn_mnist", setting, device, "resnet50")
        assert net.channels_last == (setting != "fp32")
        grads = []
        hook = net.head.fc.weight.register_hook(grads.append)
        bench.step(net, torch.rand(2, 3, 28, 28) * 255, setting)
        hook.remove()
        assert len(grads) == 1 and grads[0].abs().sum() > 0  # a real backward reached the head
        assert all(p.grad is None for p in net.parameters())  # and the step cleared it
    rates = bench.measure("ie_cnn_mnist", ["fp32", "channels_last"], batch=2, device=device, rounds=1, steps=1)
    assert set(rates) == {"fp32", "channels_last"} and all(r > 0 for r in rates.values())


def test_an_evaluation_job_takes_the_settings_and_seed_of_the_training_run_it_evaluates(tmp_path):
    summarize_sweep = load_script("summarize_sweep")
    training = write_sweep(tmp_path / "train", [("random", 3, 0.0), ("doppel", 3, 0.0), ("random", 4, 0.0)])
    evaluations = [(training / "0", 0.10), (training / "1", 0.25), (training / "2", 0.20)]
    for i, (run, top1) in enumerate(evaluations):
        job = tmp_path / "eval" / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(
            f"- ckpt_path={run}/checkpoints/last.ckpt\n- eval=[prototype,classifier_learning]\n")
        (job / "metrics.json").write_text(json.dumps({"test/novel/top1": top1}))
    table = summarize_sweep.summarize(summarize_sweep.load_jobs(tmp_path / "eval"), ["sampler"],
                                      ["test/novel/top1"], baseline="sampler=random").splitlines()
    assert table[2] == f"| sampler=random | 2 | 15.00 ± {12.706205 * math.sqrt(50) / math.sqrt(2):.2f} |"
    # paired on the training seed 3 (the evaluation jobs set none): 25 - 10
    assert table[-3] == "| sampler=doppel | 1 | +15.00 (one pair: no test) |"
    ensemble = tmp_path / "ensemble" / "0"
    (ensemble / ".hydra").mkdir(parents=True)
    (ensemble / ".hydra" / "overrides.yaml").write_text(f"- ckpt_path=[{training}/0/c.ckpt,{training}/1/c.ckpt]\n")
    assert summarize_sweep.read_overrides(ensemble) == {"ckpt_path": f"[{training}/0/c.ckpt,{training}/1/c.ckpt]"}
    (ensemble / ".hydra" / "overrides.yaml").write_text(f"- ckpt_path={tmp_path}/moved.ckpt\n")
    with pytest.raises(SystemExit, match="moved.ckpt, whose run has no .hydra/overrides.yaml"):
        summarize_sweep.read_overrides(ensemble)


def test_the_best_mean_of_each_column_is_bold_and_the_table_goes_to_wandb(tmp_path, monkeypatch):
    summarize_sweep = load_script("summarize_sweep")
    jobs = []
    for setting, seed, top1, loss in [("a", 0, 0.5, 0.2), ("a", 1, 0.7, 0.4), ("b", 0, 0.6, 0.1), ("b", 1, 0.6, 0.3),
                                      ("c", 0, 0.1, 0.9)]:
        jobs.append(({"sampler": setting, "seed": str(seed)}, {"test/top1": top1, "test/loss": loss}, tmp_path))
    lines = summarize_sweep.summarize(jobs, None, ["test/top1", "test/loss"]).splitlines()
    # a tie on top-1 (60 and 60) bolds both; the lowest loss (20) is the best loss
    assert lines[2].startswith("| sampler=a | 2 | **60.00 ± ") and "| 30.00 ± " in lines[2]
    assert lines[3].startswith("| sampler=b | 2 | **60.00 ± ") and "| **20.00 ± " in lines[3]
    assert lines[4] == "| sampler=c | 1 | 10.00 | 90.00 |"  # one run: no interval, not "± 0.00"
    assert summarize_sweep.present_metrics(jobs) == ["test/loss", "test/top1"]  # no prototype metric: all test/
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    table = summarize_sweep.row_statistics(jobs, None, ["test/top1"])
    run = summarize_sweep.log_to_wandb(table, ["test/top1"], "doppel-test", "summary")
    logged = json.loads(next(run.rglob("files/media/table/sweep/summary_*.table.json")).read_text())
    assert logged["columns"] == ["setting", "runs", "test/top1 mean", "test/top1 ci95"]
    assert [row[:3] for row in logged["data"]] == [["sampler=a", 2, 60.0], ["sampler=b", 2, 60.0],
                                                   ["sampler=c", 1, 10.0]]
    assert logged["data"][0][3] == pytest.approx(12.706205 * 14.142136 / math.sqrt(2), rel=1e-5)
    assert logged["data"][2][3] is None  # one run has no interval


def test_a_series_no_run_logged_is_said_to_be_missing(tmp_path):
    summarize_sweep = load_script("summarize_sweep")
    jobs = load_jobs_with_logs(tmp_path, summarize_sweep)
    missing = summarize_sweep.series_table(jobs, None, "embedding/norm_var")
    assert missing == "embedding/norm_var: not logged by these runs."
    assert "| sampler=random | 0.5 |" in summarize_sweep.series_table(jobs, None, "doppel/churn")


def load_jobs_with_logs(tmp_path, summarize_sweep):
    root = write_sweep(tmp_path / "s", [("random", 0, 0.1)])
    (root / "0" / "csv").mkdir()
    (root / "0" / "csv" / "metrics.csv").write_text("epoch,step,doppel/churn\n0,5,0.5\n")
    return summarize_sweep.load_jobs(root)


def test_a_training_job_resumed_from_its_own_checkpoint_keeps_its_settings(tmp_path):
    summarize_sweep = load_script("summarize_sweep")
    for i, checkpoint in enumerate(["auto", "{job}/checkpoints/last.ckpt"]):
        job = tmp_path / str(i)
        (job / ".hydra").mkdir(parents=True)
        resumed_from = checkpoint.format(job=job)
        (job / ".hydra" / "overrides.yaml").write_text(
            f"- sampler=doppel_balanced\n- seed={i}\n- ckpt_path={resumed_from}\n")
        assert summarize_sweep.read_overrides(job) == {"sampler": "doppel_balanced", "seed": str(i)}


def test_a_report_renders_in_headless_chromium_every_image_and_table(tmp_path):
    """Skipped where Debian's chromium is not installed (apt-get install chromium)."""
    check = load_script("check_report_in_browser")
    binary = check.browser()
    if binary is None:
        pytest.skip("no Chromium on this machine: apt-get install chromium")
    from doppel.report import build_report
    from tests.test_report import _Page, _png, _run

    runs = [_run(tmp_path / str(i), lr=0.01 * (i + 1), top1=0.5, losses=[3.0, 2.0, 1.5]) for i in range(2)]
    _png(runs[0] / "precision_coverage.png", (255, 0, 0))
    _png(runs[1] / "diagnostics" / "gallery_e000.png", (0, 0, 255))
    page_text = build_report(runs)
    report = tmp_path / "report.html"
    report.write_text(page_text)
    page = _Page()
    page.feed(page_text)
    seen = check.rendered(report, binary)
    widths = {alt: width for alt, width, _ in seen["images"]}
    assert set(widths) == set(page.images) and len(seen["images"]) == len(page.images)
    assert widths["precision_coverage"] == 9 and widths["gallery_e000"] == 9  # the PNGs the runs hold
    assert all(width > 100 for alt, width in widths.items() if alt not in ("precision_coverage", "gallery_e000"))
    assert seen["tables"] == {name: len(rows) for name, rows in page.tables.items()}
    assert check.main([str(report), "--screenshot", str(tmp_path / "shot.png")]) == 0
    from PIL import Image

    with Image.open(tmp_path / "shot.png") as shot:  # the whole page, as tall as the browser laid it out
        assert shot.size == (1280, seen["height"]) and seen["height"] > 500
    # an image the browser cannot decode is reported
    report.write_text(page_text.replace("base64,iVBOR", "base64,AAAA", 1))
    assert check.main([str(report)]) == 1
