import random

import numpy as np
import pytest
import torch

from weather_restore.checkpoint import (
    config_hash,
    load_checkpoint,
    restore_rng_state,
    resume_state,
    rng_state,
    save_checkpoint,
)
from weather_restore.errors import ModelFileError


def state(iteration: int, iterations: int = 10, digest: str = "abc") -> dict:
    return {"iteration": iteration, "iterations": iterations, "config_hash": digest, "weights": torch.arange(3.0)}


def test_config_hash_ignores_key_order_and_sees_values():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_save_then_load_round_trips_with_weights_only(tmp_path):
    path = tmp_path / "models" / "checkpoint.pt"
    save_checkpoint(path, state(3))
    loaded = load_checkpoint(path)
    assert loaded["iteration"] == 3
    assert torch.equal(loaded["weights"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state(3))
    with pytest.raises(Exception):  # noqa: B017 - whatever torch raises for an unpicklable value
        save_checkpoint(path, {**state(4), "oops": lambda: None})
    assert load_checkpoint(path)["iteration"] == 3


def test_a_file_that_needs_code_to_load_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "payload": np.random.default_rng(0)}, path)  # an arbitrary object: pickled code
    with pytest.raises(ModelFileError, match=r"checkpoint\.pt: not a weather-restore checkpoint \(weights-only"):
        load_checkpoint(path)


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(ModelFileError, match="weather-restore train"):
        load_checkpoint(tmp_path / "none.pt")


def test_resume_takes_an_unfinished_checkpoint_of_the_same_config(tmp_path):
    path = tmp_path / "checkpoint.pt"
    assert resume_state(path, "abc") is None
    save_checkpoint(path, state(4))
    assert resume_state(path, "abc")["iteration"] == 4


def test_a_finished_training_is_not_resumed(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state(10, digest="other"))
    assert resume_state(path, "abc") is None


def test_an_unfinished_checkpoint_of_another_config_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state(4, digest="other"))
    with pytest.raises(ModelFileError) as info:
        resume_state(path, "abc")
    message = str(info.value)
    assert str(path) in message
    assert "iteration 4 of 10" in message
    assert "delete the file" in message and "--restart" in message


def test_random_states_survive_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_use_names_the_weights_file_and_a_best_of_another_training_is_refused(tmp_path):
    from weather_restore.checkpoint import trained_weights

    save_checkpoint(tmp_path / "checkpoint.pt", {"model_name": "dwgn", "training_id": "a"})
    assert trained_weights(tmp_path, "last") == tmp_path / "checkpoint.pt"
    with pytest.raises(ModelFileError, match=r"best.pt: no such file \(training.<model>.use: best\)"):
        trained_weights(tmp_path, "best")
    save_checkpoint(tmp_path / "best.pt", {"model_name": "dwgn", "training_id": "a"})
    assert trained_weights(tmp_path, "best") == tmp_path / "best.pt"
    save_checkpoint(tmp_path / "checkpoint.pt", {"model_name": "dwgn", "training_id": "b"})  # restarted since
    with pytest.raises(ModelFileError, match=r"the best weights of another training"):
        trained_weights(tmp_path, "best")
