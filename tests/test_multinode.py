"""Training across machines: two torchrun "nodes" on this machine (c10d rendezvous, gloo), each a separate
`torchrun --nnodes 2 --nproc-per-node 1` process with its own working folder, as two machines have two disks.

Node A (--local-addr 127.0.0.1) sorts first, so it is rank 0 on every launch; node B (127.0.0.2) is rank 1 and must
write nothing. The data folder is shared (each machine has its own copy, pulled with DVC, in practice).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from tests.servers import free_port
from tests.stores import all_runs, client
from tests.stores import own_store_environment as environment

from weather_restore.checkpoint import load_checkpoint
from weather_restore.config import parse_params
from weather_restore.models import build_model
from weather_restore.train import Distributed, lost_peer, lost_peer_error, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ITERATIONS = 40
NODES = {"a": "127.0.0.1", "b": "127.0.0.2"}  # rank 0, rank 1: torchrun orders the nodes by address
PEER_TIMEOUT = 20  # seconds a collective waits for a peer that does not answer


@pytest.fixture(scope="module")
def params_dict(tiny_params_dict) -> dict:
    """A tracked tiny DwGN training; the global batch of 4 is 2 per node."""
    return tiny_params_dict(
        "dwgn",
        tracking=True,
        iterations=ITERATIONS,
        batch_size=4,
        checkpoint_every=4,
        validate_every=20,
        log_every=1,
        peer_timeout=PEER_TIMEOUT,
    )


def new_nodes(root: Path, params: dict) -> dict[str, Path]:
    """One working folder per node, each holding only params.yaml."""
    folders = {}
    for node in NODES:
        folders[node] = root / node
        folders[node].mkdir(parents=True)
        (folders[node] / "params.yaml").write_text(yaml.safe_dump(params))
    return folders


def start_nodes(folders: dict[str, Path], data: Path, endpoint: str) -> dict[str, subprocess.Popen]:
    """The same torchrun command on both nodes; node A's torchrun hosts the rendezvous at `endpoint`."""
    processes = {}
    for node, address in NODES.items():
        command = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "tiny",
            "--local-addr", address,
            "-m", "weather_restore.cli", "train", "--model", "dwgn", "--data", str(data),
        ]  # fmt: skip
        processes[node] = subprocess.Popen(
            command,
            cwd=folders[node],
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return processes


def finish(processes: dict[str, subprocess.Popen], timeout: float = 120) -> dict[str, str]:
    outputs = {node: process.communicate(timeout=timeout)[0] for node, process in processes.items()}
    for node, process in processes.items():
        assert process.returncode == 0, f"node {node} failed:\n{outputs[node]}"
    return outputs


def kill_node(process: subprocess.Popen) -> None:
    """SIGKILL a node, as if its machine died: its workers (each in a session of its own, torchrun starts them
    so) and its torchrun."""
    tasks = Path(f"/proc/{process.pid}/task").iterdir()
    workers = [int(pid) for task in tasks for pid in (task / "children").read_text().split()]
    assert workers, "node B's torchrun has no worker to kill"
    for pid in [*workers, process.pid]:
        os.kill(pid, signal.SIGKILL)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder / "models/dwgn/checkpoint.pt")["model"]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, tiny_mwvd, params_dict) -> dict[str, Path]:
    """The uninterrupted two-node training every other one is compared with."""
    folders = new_nodes(tmp_path_factory.mktemp("multinode") / "whole", params_dict)
    finish(start_nodes(folders, tiny_mwvd, f"127.0.0.1:{free_port()}"))
    return folders


def test_two_nodes_train_to_the_weights_of_one_process_and_only_rank_0_writes(
    two_nodes, tiny_mwvd, params_dict, tmp_path
):
    params = parse_params({**params_dict, "tracking": {"enabled": False}})
    train(
        "dwgn",
        params,
        data_root=tiny_mwvd,
        out_dir=tmp_path / "models/dwgn",
        reports_dir=tmp_path / "reports",
        project_root=tmp_path,
    )
    one, two = weights(tmp_path), weights(two_nodes["a"])
    assert one.keys() == two.keys()
    for name, tensor in one.items():  # the order of the sums differs: 5e-7 apart at most here, for weights near 1
        torch.testing.assert_close(two[name], tensor, rtol=0, atol=5e-6, msg=name)
    torch.manual_seed(params.training.dwgn.seed)  # the weights training starts from
    untrained = build_model("dwgn", **params_dict["models"]["dwgn"])
    untrained.start_from_identity()
    assert max((two[name] - tensor).abs().max() for name, tensor in untrained.state_dict().items()) > 1e-2

    (run,) = all_runs(two_nodes["a"])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert [m.step for m in client(two_nodes["a"]).get_metric_history(run.info.run_id, "loss")] == list(
        range(1, ITERATIONS + 1)
    )
    assert sorted(path.name for path in two_nodes["b"].iterdir()) == ["params.yaml"]  # rank 1 wrote nothing


def test_a_killed_node_fails_the_other_in_one_line_and_the_rerun_resumes_to_the_same_weights(
    two_nodes, tiny_mwvd, params_dict, tmp_path
):
    folders = new_nodes(tmp_path, params_dict)
    checkpoint = folders["a"] / "models/dwgn/checkpoint.pt"
    endpoint = f"127.0.0.1:{free_port()}"
    processes = start_nodes(folders, tiny_mwvd, endpoint)
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and processes["a"].poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_node(processes["b"])
    killed = time.monotonic()
    processes["b"].communicate()
    survivor = processes["a"].communicate(timeout=PEER_TIMEOUT + 30)[0]
    noticed = time.monotonic() - killed

    assert processes["a"].returncode != 0, survivor
    saved = load_checkpoint(checkpoint)["iteration"]
    assert 0 < saved < ITERATIONS, "the training ended before node B was killed"
    lines = [line for line in survivor.splitlines() if "lost the others" in line]
    assert len(lines) == 1, survivor
    (line,) = lines
    assert line.startswith("weather-restore train: training dwgn: process 0 of 2 lost the others (")
    assert f"resumes from the last checkpoint, models/dwgn/checkpoint.pt (iteration {saved})" in line
    assert not any(line.startswith("[rank") for line in survivor.splitlines()), survivor  # no worker traceback
    assert noticed < PEER_TIMEOUT, f"node A took {noticed:.0f} s to notice"
    assert sorted(path.name for path in folders["b"].iterdir()) == ["params.yaml"]

    outputs = finish(start_nodes(folders, tiny_mwvd, endpoint))  # the same commands again

    assert f"resuming models/dwgn/checkpoint.pt from iteration {saved} of {ITERATIONS}" in outputs["a"]
    whole, resumed = weights(two_nodes["a"]), weights(folders["a"])
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), f"{name} differs after resuming at {saved}"
    (run,) = all_runs(folders["a"])  # the killed run, reopened and finished
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_iteration"] == str(saved)
    losses = client(folders["a"]).get_metric_history(run.info.run_id, "loss")
    (reference,) = all_runs(two_nodes["a"])
    assert [(m.step, m.value) for m in losses] == [
        (m.step, m.value) for m in client(two_nodes["a"]).get_metric_history(reference.info.run_id, "loss")
    ]
    assert sorted(path.name for path in folders["b"].iterdir()) == ["params.yaml"]


def test_nodes_of_another_configuration_are_refused_in_one_line_before_anything_is_written(
    tiny_mwvd, params_dict, tmp_path
):
    folders = new_nodes(tmp_path, params_dict)
    other = {**params_dict, "training": {"dwgn": {**params_dict["training"]["dwgn"], "lr": 5e-4}}}
    (folders["b"] / "params.yaml").write_text(yaml.safe_dump(other))  # node B was not updated
    processes = start_nodes(folders, tiny_mwvd, f"127.0.0.1:{free_port()}")
    for node, process in processes.items():
        output = process.communicate(timeout=120)[0]
        assert process.returncode != 0, output
        lines = [line for line in output.splitlines() if "another configuration or data" in line]
        assert len(lines) == 1, output
        assert lines[0].startswith("weather-restore train: training dwgn: process 1 of 2 has another configuration")
        assert lines[0].endswith("run every node from the same commit and params.yaml, with the same data (dvc pull)")
        assert sorted(path.name for path in folders[node].iterdir()) == ["params.yaml"], node


def test_only_a_lost_peer_becomes_the_one_line_failure_and_each_process_names_where_to_resume_from():
    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:41234: Connection reset "
        "by peer. This is typically caused by a remote worker hanging or bugs in the application."
    )
    assert lost_peer(gloo) and lost_peer(dist.DistBackendError("NCCL communicator was aborted on rank 1"))
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))

    checkpoint, cpu = Path("models/dwgn/checkpoint.pt"), torch.device("cpu")
    lost = "training dwgn: process {} of 2 lost the others (Read error [10.0.0.2]:41234: Connection reset by peer): "
    again = "Start the same torchrun command on every node again; "
    rank_0 = str(lost_peer_error(gloo, "dwgn", Distributed(0, 2, cpu), checkpoint, 8))
    assert rank_0.startswith(lost.format(0))
    assert rank_0.endswith(
        again + "the training resumes from the last checkpoint, models/dwgn/checkpoint.pt (iteration 8)."
    )
    assert str(lost_peer_error(gloo, "dwgn", Distributed(0, 2, cpu), checkpoint, None)).endswith(
        again + "no checkpoint was written yet, so the training starts afresh."
    )
    rank_1 = str(lost_peer_error(gloo, "dwgn", Distributed(1, 2, cpu), checkpoint, None))
    assert rank_1.startswith(lost.format(1)) and "\n" not in rank_1
    assert rank_1.endswith(
        again + "the training resumes from the last checkpoint process 0 wrote (models/dwgn/checkpoint.pt on its node)."
    )
