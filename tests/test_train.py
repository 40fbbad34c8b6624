"""The train stage on a tiny real MWVD tree: learning, checkpoints, resume after SIGKILL, torchrun, failures."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from weather_restore.checkpoint import load_checkpoint, load_model, save_checkpoint
from weather_restore.config import parse_params
from weather_restore.data.dataset import ClipDataset, FrameDataset, spread_over_weathers
from weather_restore.errors import ConfigError, ModelFileError, TrainingError
from weather_restore.losses import LOSSES
from weather_restore.models import build_model
from weather_restore.train import input_psnr, lr_schedule, train, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def run_train(params: dict, model: str, tiny_mwvd: Path, tmp_path: Path, **kwargs):
    return train(
        model,
        parse_params(params),
        data_root=tiny_mwvd,
        out_dir=tmp_path / "models" / model,
        reports_dir=tmp_path / "reports" / model,
        project_root=tmp_path,
        **kwargs,
    )


def test_a_partial_training_section_keeps_the_models_own_recipe():
    params = parse_params({"training": {"dwgn": {"iterations": 5}, "dynstaticnet": {"iterations": 7}}})
    assert (params.training.dwgn.iterations, params.training.dwgn.loss, params.training.dwgn.lr_min) == (5, "l1", 1e-6)
    assert (params.training.dynstaticnet.loss, params.training.dynstaticnet.lr_min) == ("psnr", 1e-7)


@pytest.mark.parametrize(("model_name", "lr"), [("dynstaticnet", 3e-3), ("dwgn", 2e-3)])
def test_a_tiny_model_overfits_one_batch(tiny_mwvd, tiny_models, model_name, lr):
    torch.manual_seed(0)
    model = build_model(model_name, **tiny_models[model_name])
    if model_name == "dynstaticnet":
        dataset = ClipDataset(tiny_mwvd, "train", frames=2, crop=16)
    else:
        dataset = FrameDataset(tiny_mwvd, "train", crop=16)
    samples = [dataset[(i, (0, i))] for i in (0, len(dataset) // 2)]
    degraded = torch.stack([s["degraded"] for s in samples])
    clean = torch.stack([s["clean"] for s in samples])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = [train_step(model, degraded, clean, optimizer, LOSSES["l1"]) for _ in range(120)]
    assert min(losses[-5:]) < losses[0] / 10, f"L1 went from {losses[0]:.4f} to {losses[-1]:.4f}"


def test_warm_up_ramps_to_the_peak_then_the_cosine_decays_to_lr_min_and_resumes_where_it_was():
    recipe = {"iterations": 10, "warmup": 0.3, "lr": 1e-3, "lr_min": 1e-6}
    cfg = parse_params({"training": {"dwgn": recipe}}).training.dwgn
    weight = torch.nn.Parameter(torch.zeros(1))

    def schedule(state=None):
        optimizer = torch.optim.SGD([weight], lr=cfg.lr)
        scheduler = lr_schedule(optimizer, cfg)
        if state:
            optimizer.load_state_dict(state[0])
            scheduler.load_state_dict(state[1])
        return optimizer, scheduler

    optimizer, scheduler = schedule()
    lrs, states = [], []
    for _ in range(cfg.iterations):
        lrs.append(optimizer.param_groups[0]["lr"])
        states.append((optimizer.state_dict(), scheduler.state_dict()))
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a > b for a, b in zip(lrs[3:-1], lrs[4:], strict=True)) and lrs[-1] > cfg.lr_min
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr_min)
    resumed, _ = schedule(states[5])
    assert resumed.param_groups[0]["lr"] == pytest.approx(lrs[5])
    with pytest.raises(ConfigError, match="training.dwgn.warmup"):
        parse_params({"training": {"dwgn": {"warmup": 1.0}}})
    short = parse_params({"training": {"dwgn": {"iterations": 2, "warmup": 0.9}}}).training.dwgn
    optimizer = torch.optim.SGD([weight], lr=short.lr)
    lr_schedule(optimizer, short)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(short.lr / 2)  # one ramp step, one cosine step


def test_gradient_clipping_bounds_the_norm_of_a_step():
    def step_norm(grad_clip):
        model = torch.nn.Linear(4, 3)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        degraded, clean = torch.full((2, 4), 10.0), torch.zeros(2, 3)
        train_step(model, degraded, clean, optimizer, LOSSES["l1"], grad_clip=grad_clip)
        return (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm().item()

    assert step_norm(0.0) > 1.0
    assert step_norm(0.5) == pytest.approx(0.5, rel=1e-4)


def test_training_writes_checkpoint_curves_and_validation(tiny_mwvd, tmp_path, tiny_params_dict):
    summary = run_train(tiny_params_dict("dwgn"), "dwgn", tiny_mwvd, tmp_path)
    assert summary.start_iteration == 0 and summary.iterations == 6
    assert 0.0 <= summary.data_wait_fraction < 1.0
    rows = read_rows(tmp_path / "reports/dwgn/train.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # cosine annealing
    validation = read_rows(tmp_path / "reports/dwgn/validation.csv")
    assert [int(r["iteration"]) for r in validation] == [3, 6]
    assert float(validation[-1]["val_psnr"]) == pytest.approx(summary.val_psnr, abs=1e-4)
    state = load_checkpoint(tmp_path / "models/dwgn/checkpoint.pt")
    assert state["iteration"] == state["iterations"] == 6
    assert state["model_name"] == "dwgn"
    model = build_model("dwgn", **state["model_config"])
    model.load_state_dict(state["model"])
    assert {"optimizer", "scheduler", "scaler", "rng", "config_hash"} <= state.keys()


def test_validation_reads_the_val_split_only_and_keeps_the_best_weights(tiny_mwvd, tmp_path, tiny_params_dict):
    data = tmp_path / "mwvd"
    shutil.copytree(tiny_mwvd, data)
    shutil.rmtree(data / "test")  # a test split that cannot be read: training must not need it
    summary = run_train(tiny_params_dict("dwgn", ema_decay=0.5), "dwgn", data, tmp_path)

    val_set = ClipDataset(data, "val", frames=2, augment=False)
    samples = [val_set[i] for i in spread_over_weathers(val_set.clips, 2)]
    assert {sample["clip_id"] for sample in samples} <= {c.id for c in val_set.clips}
    assert summary.val_input_psnr == pytest.approx(input_psnr(samples), abs=1e-9)
    rows = read_rows(tmp_path / "reports/dwgn/validation.csv")
    best_row = max(rows, key=lambda row: float(row["val_psnr"]))
    best = load_checkpoint(tmp_path / "models/dwgn/best.pt")
    assert best["iteration"] == int(best_row["iteration"]) == summary.best_iteration
    assert best["val_psnr"] == pytest.approx(float(best_row["val_psnr"]), abs=1e-4)
    # best.pt holds the EMA's weights, which `load_model` of the last checkpoint also returns
    last = load_checkpoint(tmp_path / "models/dwgn/checkpoint.pt")
    shipped = load_model(tmp_path / "models/dwgn/checkpoint.pt").state_dict()
    assert all(torch.equal(shipped[name], tensor) for name, tensor in last["ema"]["weights"].items())
    if best["iteration"] == last["iteration"]:
        assert all(torch.equal(best["model"][name], tensor) for name, tensor in last["ema"]["weights"].items())


def test_running_a_finished_training_again_starts_afresh(tiny_mwvd, tmp_path, tiny_params_dict):
    params = tiny_params_dict("dwgn", iterations=2, checkpoint_every=1)
    run_train(params, "dwgn", tiny_mwvd, tmp_path)
    again = run_train(params, "dwgn", tiny_mwvd, tmp_path)
    assert again.start_iteration == 0
    assert len(read_rows(tmp_path / "reports/dwgn/train.csv")) == 2


def test_an_unfinished_checkpoint_of_another_config_is_refused(tiny_mwvd, tmp_path, tiny_params_dict):
    run_train(tiny_params_dict("dwgn", iterations=2), "dwgn", tiny_mwvd, tmp_path)
    path = tmp_path / "models/dwgn/checkpoint.pt"
    save_checkpoint(path, {**load_checkpoint(path), "iteration": 1})  # as if it had crashed after iteration 1
    with pytest.raises(ModelFileError, match=r"another configuration"):
        run_train(tiny_params_dict("dwgn", iterations=2, lr=5e-4), "dwgn", tiny_mwvd, tmp_path)
    resumed = run_train(tiny_params_dict("dwgn", iterations=2, lr=5e-4), "dwgn", tiny_mwvd, tmp_path, restart=True)
    assert resumed.start_iteration == 0


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_mwvd, tmp_path, tiny_params_dict):
    params = tiny_params_dict("dwgn", iterations=5, checkpoint_every=1, lr=1e30, loss="psnr")
    with pytest.raises(TrainingError) as info:
        run_train(params, "dwgn", tiny_mwvd, tmp_path)
    message = str(info.value)
    assert "the loss is" in message and "training.dwgn.lr" in message
    saved = load_checkpoint(tmp_path / "models/dwgn/checkpoint.pt")["iteration"]
    assert f"(iteration {saved}) is kept" in message


def test_a_batch_that_does_not_divide_among_processes_is_refused(tiny_mwvd, tmp_path, tiny_params_dict, monkeypatch):
    from weather_restore import train as train_module

    fake = train_module.Distributed(0, 2, torch.device("cpu"))
    monkeypatch.setattr(train_module, "setup_distributed", lambda peer_timeout: fake)
    with pytest.raises(TrainingError, match=r"batch_size 3 does not divide among 2 processes"):
        run_train(tiny_params_dict("dwgn", batch_size=3), "dwgn", tiny_mwvd, tmp_path)


# --- real processes: kill and resume, torchrun ---------------------------------------------------------------


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from weather_restore.cli import main; sys.exit(main())", *args]


def test_a_training_killed_mid_way_resumes_to_the_same_weights(tiny_mwvd, tmp_path, tiny_params_dict):
    params = write_params(
        tmp_path / "params.yaml",
        tiny_params_dict("dwgn", iterations=40, checkpoint_every=4, validate_every=4, workers=1, ema_decay=0.9),
    )
    env = {**os.environ, "WEATHER_RESTORE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}

    def command(name: str) -> list[str]:
        return cli(
            "--params",
            str(params),
            "train",
            "--model",
            "dwgn",
            "--data",
            str(tiny_mwvd),
            "--out",
            str(tmp_path / name / "models"),
            "--reports",
            str(tmp_path / name / "reports"),
        )

    subprocess.run(command("whole"), cwd=tmp_path, env=env, check=True, capture_output=True)

    checkpoint = tmp_path / "cut" / "models" / "checkpoint.pt"
    process = subprocess.Popen(
        command("cut"), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the training ended before it could be killed"
    killed_at = load_checkpoint(checkpoint)["iteration"]
    assert 0 < killed_at < 40

    result = subprocess.run(command("cut"), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

    whole = load_checkpoint(tmp_path / "whole" / "models" / "checkpoint.pt")
    resumed = load_checkpoint(checkpoint)
    assert resumed["iteration"] == 40
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), f"{name} differs after resuming at {killed_at}"
    # The EMA resumes with the checkpoint, bit for bit, and so does the choice of best.pt (EMA weights).
    assert whole["ema"]["updates"] == resumed["ema"]["updates"] == 40
    for name, tensor in whole["ema"]["weights"].items():
        assert torch.equal(tensor, resumed["ema"]["weights"][name]), f"EMA {name} differs after resuming"
    whole_best, cut_best = (load_checkpoint(tmp_path / run / "models" / "best.pt") for run in ("whole", "cut"))
    assert (cut_best["iteration"], cut_best["val_psnr"]) == (whole_best["iteration"], whole_best["val_psnr"])
    assert all(torch.equal(tensor, cut_best["model"][name]) for name, tensor in whole_best["model"].items())
    assert not all(torch.equal(whole["ema"]["weights"][name], t) for name, t in whole["model"].items())
    whole_losses = [r["loss"] for r in read_rows(tmp_path / "whole" / "reports" / "train.csv")]
    cut_losses = [r["loss"] for r in read_rows(tmp_path / "cut" / "reports" / "train.csv")]
    assert cut_losses == whole_losses


def test_two_processes_under_torchrun_follow_the_single_process_loss_curve(tiny_mwvd, tmp_path, tiny_params_dict):
    """Same global batch (4): two gloo processes of 2 each see exactly the batches one process sees."""
    params = write_params(tmp_path / "params.yaml", tiny_params_dict("dwgn", iterations=8, batch_size=4))
    env = {**os.environ, "WEATHER_RESTORE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}

    def args(name: str) -> list[str]:
        return [
            "--params",
            str(params),
            "train",
            "--model",
            "dwgn",
            "--data",
            str(tiny_mwvd),
            "--out",
            str(tmp_path / name / "models"),
            "--reports",
            str(tmp_path / name / "reports"),
        ]

    subprocess.run(cli(*args("one")), cwd=tmp_path, env=env, check=True, capture_output=True)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "weather_restore.cli",
        *args("two"),
    ]
    result = subprocess.run(torchrun, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    one = [float(r["loss"]) for r in read_rows(tmp_path / "one" / "reports" / "train.csv")]
    two = [float(r["loss"]) for r in read_rows(tmp_path / "two" / "reports" / "train.csv")]
    assert len(one) == len(two) == 8
    assert two == pytest.approx(one, rel=1e-3)
    assert sum(one[4:]) < sum(one[:4])  # it learns: single batches are noisy, halves less so
