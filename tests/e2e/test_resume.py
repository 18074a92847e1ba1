"""A run killed or stopped at any step and resumed with ``ckpt_path=auto`` ends exactly as if never stopped."""

import random
import shlex
import signal

import pytest
import torch

from doppel.callbacks.checkpointing import RunInterrupted
from doppel.serialization import CheckpointError
from doppel.train import train
from tests.conftest import TINY, compose_cfg
from tests.e2e.cli import run_cli

STEPS_PER_EPOCH, EPOCHS, EVERY = 6, 3, 4
# Every random stream of a run: the sampler (doppel), augmentation, the Margin loss's pair sampling (mb)
# and, through dropout, the global torch RNG; validation mid-run; step checkpoints between epoch ends.
RUN = [*TINY, f"trainer.max_epochs={EPOCHS}", f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
       "+backbone.dropout=0.1", f"checkpoint.every_n_steps={EVERY}"]


def fault(step, signum):
    return ["+callbacks.fault._target_=tests.e2e.faults.SignalAtStep", f"+callbacks.fault.step={step}",
            f"+callbacks.fault.signum={signum}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli([*RUN, f"hydra.run.dir={folder}/run"], cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return (folder / "run" / "metrics.json").read_bytes()


@pytest.mark.parametrize("signum", ["SIGKILL", "SIGINT", "SIGTERM"])
def test_a_run_stopped_mid_epoch_resumes_to_byte_identical_metrics(uninterrupted, tmp_path, signum):
    total = STEPS_PER_EPOCH * EPOCHS
    step = random.SystemRandom().choice([s for s in range(2, total) if s % STEPS_PER_EPOCH])  # not an epoch end
    run = tmp_path / "run"
    stop_and_resume(run, tmp_path, signum, step, uninterrupted)


@pytest.mark.parametrize("step", [2, 5])
def test_a_run_killed_before_or_just_after_its_first_checkpoint_resumes_exactly(uninterrupted, tmp_path, step):
    stop_and_resume(tmp_path / "run", tmp_path, "SIGKILL", step, uninterrupted)


def stop_and_resume(run, cwd, signum, step, uninterrupted):
    stopped = run_cli([*RUN, f"hydra.run.dir={run}", *fault(step, signum)], cwd=cwd)
    last = run / "checkpoints" / "last.ckpt"
    if signum == "SIGKILL":  # killed in the middle of the step: the newest checkpoint is an older one, if any
        assert stopped.returncode == -signal.SIGKILL, f"step {step}"
        saved = max(EVERY * ((step - 1) // EVERY), STEPS_PER_EPOCH * ((step - 1) // STEPS_PER_EPOCH))
        if saved == 0:
            assert not last.exists()  # nothing to resume: ckpt_path=auto starts the run anew
        else:
            assert torch.load(last, weights_only=True)["global_step"] == saved, f"step {step}"
    else:  # the step is finished, saved, and the process ends with the shell's code for the signal
        assert stopped.returncode == 128 + getattr(signal, signum), f"step {step}: {stopped.stderr[-2000:]}"
        assert f"interrupted by {signum} at step {step}: saved {run}/checkpoints/last.ckpt" in stopped.stderr
        assert torch.load(last, weights_only=True)["global_step"] == step
    assert not (run / "metrics.json").exists()

    command = [*RUN, f"hydra.run.dir={run}", "ckpt_path=auto"]
    if signum != "SIGKILL":  # the command it printed, which is what resumes (the fault injection left out here)
        printed = shlex.split(stopped.stderr.split("resume it with: ")[1].splitlines()[0])
        assert printed == ["python", "train.py", *RUN, *fault(step, signum), *command[len(RUN):]]
    had_checkpoint = last.exists()
    resumed = run_cli(command, cwd=cwd)
    assert resumed.returncode == 0, f"step {step}: {resumed.stderr[-3000:]}"
    said_fresh = "has no checkpoint, so this is a new run" in resumed.stdout + resumed.stderr
    assert said_fresh == (not had_checkpoint), f"step {step}"
    assert (run / "metrics.json").read_bytes() == uninterrupted, f"{signum} at step {step}"


@pytest.mark.parametrize("workers", [0, 2])  # with workers, batches are drawn ahead of training
def test_table_and_batches_after_a_resume_are_those_of_the_uninterrupted_run(tmp_path, workers):
    from tests.e2e.recorder import BatchRecorder

    record = ["+callbacks.recorder._target_=tests.e2e.recorder.BatchRecorder", f"data.num_workers={workers}"]
    BatchRecorder.batches = []
    # with the pictures: the diagnostics' state (this epoch's norms so far) must resume exactly too
    full_metrics = train(compose_cfg(tmp_path / "full", [*RUN, *record], pictures=True))
    full_batches = list(BatchRecorder.batches)
    by_epoch = [[b for e, b in full_batches if e == epoch] for epoch in range(EPOCHS)]
    assert all(len(b) == STEPS_PER_EPOCH for b in by_epoch) and by_epoch[0] != by_epoch[1]  # set_epoch reached
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)

    with pytest.raises(RunInterrupted, match="SIGTERM at step 9"):
        train(compose_cfg(tmp_path / "cut", [*RUN, *fault(9, "SIGTERM"), f"data.num_workers={workers}"],
                          pictures=True))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back
    BatchRecorder.batches = []
    resumed_metrics = train(compose_cfg(tmp_path / "cut", [*RUN, *record, "ckpt_path=auto"], pictures=True))
    resumed = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)

    assert BatchRecorder.batches == full_batches[9:]  # from the middle of epoch 1 on, the same batches
    table = next(k for k in full["callbacks"] if "DoppelgangerMining" in k)
    assert (full["callbacks"][table]["table"] >= 0).any()
    assert torch.equal(resumed["callbacks"][table]["table"], full["callbacks"][table]["table"])
    assert resumed_metrics == full_metrics
    # every logged value too: the resumed run's metrics.csv continues the interrupted one's rows
    log = "csv/metrics.csv"
    assert (tmp_path / "cut" / log).read_text() == (tmp_path / "full" / log).read_text()
    assert "embedding/norm_mean" in (tmp_path / "full" / log).read_text()
    norms = "diagnostics/norms.json"
    assert (tmp_path / "cut" / norms).read_text() == (tmp_path / "full" / norms).read_text()


def test_a_finished_run_is_not_extended_under_a_schedule(tmp_path):
    train(compose_cfg(tmp_path, ["trainer.max_epochs=1"]))
    changed = pytest.warns(UserWarning, match=r"changed settings \(trainer.max_epochs: 1 -> 2\)")
    with changed, pytest.raises(CheckpointError, match="planned for 6 optimizer steps and this one for 12"):
        train(compose_cfg(tmp_path, ["trainer.max_epochs=2", "ckpt_path=auto"]))
    # without a schedule nothing depends on the planned length: the run goes on
    train(compose_cfg(tmp_path / "constant", ["trainer.max_epochs=1", "sched=none"]))
    with pytest.warns(UserWarning, match="changed settings"):
        metrics = train(compose_cfg(tmp_path / "constant", ["trainer.max_epochs=2", "sched=none", "ckpt_path=auto"]))
    assert metrics["train/epochs"] == 2.0


def test_auto_starts_a_new_run_when_the_folder_has_no_checkpoint(tmp_path):
    fresh = train(compose_cfg(tmp_path / "a", ["trainer.max_epochs=1"]))
    auto = train(compose_cfg(tmp_path / "b", ["trainer.max_epochs=1", "ckpt_path=auto"]))
    assert auto == fresh


def test_resuming_on_other_files_names_the_data_not_a_tensor_shape(tmp_path):
    """The same settings on other files (data.path moved to a copy that differs): the class counts are
    compared first, before any tensor shape."""
    from tests.conftest import write_emoji_npz

    first, other = write_emoji_npz(tmp_path / "a.npz", 12), write_emoji_npz(tmp_path / "b.npz", 14)
    common = ["data=emoji", "data.max_groups=null", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
              "sampler.batch_size=12"]
    train(compose_cfg(tmp_path / "run", [*common, f"data.path={first}"]))
    with pytest.raises(CheckpointError, match=r"was trained on \d+ classes and the data read now has \d+: data.root / "
                                              "data.path name other files than that run's; resume with its data"):
        train(compose_cfg(tmp_path / "run", [*common, f"data.path={other}", "ckpt_path=auto"]))


def test_eval_refuses_a_checkpoint_with_non_finite_weights(tmp_path):
    from doppel.evaluate import evaluate
    from doppel.serialization import atomic_save, load_checkpoint

    train(compose_cfg(tmp_path / "run", ["trainer.max_epochs=1", "trainer.limit_train_batches=2"]))
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    key = next(k for k in checkpoint["state_dict"] if k.endswith("head.fc.weight"))
    checkpoint["state_dict"][key][0, 0] = float("inf")
    atomic_save(checkpoint, tmp_path / "diverged.ckpt")
    overrides = [f"ckpt_path={tmp_path / 'diverged.ckpt'}"]
    with pytest.raises(CheckpointError, match=rf"has 1 non-finite values in {key}: .*use an earlier checkpoint"):
        evaluate(compose_cfg(tmp_path / "eval", overrides), overrides)
