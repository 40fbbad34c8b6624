from pathlib import Path

import pytest
import yaml

from weather_restore.config import Params, load_params, parse_params
from weather_restore.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.data.clips.clip_len == 10
    assert params.models.dynstaticnet.dim == 24


def test_empty_params_gives_the_papers_defaults():
    params = parse_params({})
    assert params == Params()
    assert params.models.dynstaticnet.blocks == (4, 6, 8)
    assert params.models.dwgn.encoder_blocks == (4, 4, 6)


def test_unknown_key_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"unknown key 'data\.clips\.clip_lenght'"):
        parse_params({"data": {"clips": {"clip_lenght": 10}}})


def test_wrong_type_names_key_value_and_rule():
    with pytest.raises(ConfigError) as info:
        parse_params({"data": {"synthetic": {"videos_per_weather": "many"}}})
    message = str(info.value)
    assert "data.synthetic.videos_per_weather" in message
    assert "'many'" in message
    assert "integer" in message


def test_out_of_range_value_is_refused():
    with pytest.raises(ConfigError, match=r"data\.clips\.clip_len' = 0 .*greater than or equal to 1"):
        parse_params({"data": {"clips": {"clip_len": 0}}})


def test_reversed_range_is_refused():
    with pytest.raises(ConfigError, match=r"data\.synthetic\.haze\.beta.*low 4\.0 is above high 2\.0"):
        parse_params({"data": {"synthetic": {"haze": {"beta": [4.0, 2.0]}}}})


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as info:
        parse_params({"data": {"clips": {"clip_len": -1, "seed": "x"}}})
    assert str(info.value).count("\n") == 1


def test_missing_or_broken_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such params file"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_params(broken)
    broken.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(broken)
