"""The one sampling table (runtime/sampling.py): every reader takes its bounds from it, so one value
is accepted or refused alike by the engine, `ask`'s flags, the server's fields and manifests. No model."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from edgelora.errors import RoleError, SamplingError
from edgelora.frontends.cli.main import cli
from edgelora.frontends.server.requests import APIError, sampling_from
from edgelora.roles.manifest import SAMPLING_KEYS, load_manifest
from edgelora.runtime.sampling import KNOBS, SAMPLING, SAMPLING_DEFAULTS, _sampling_options, check_value

# (key, a value inside, a value just outside) for every row of the table
EDGES = [(k.name, k.high, k.high + (1 if k.type is int else 0.5)) for k in SAMPLING] + \
        [(k.name, k.low, k.low - 1) for k in SAMPLING]


def test_every_row_has_a_default_inside_its_bounds_and_the_readers_know_every_row():
    for knob in SAMPLING:
        assert knob.low <= knob.default <= knob.high and knob.help
        check_value(knob.name, knob.default)
    assert set(SAMPLING_KEYS) == set(KNOBS) == set(SAMPLING_DEFAULTS) - {"stop"}


def test_the_chosen_bounds():
    assert (KNOBS["temperature"].low, KNOBS["temperature"].high) == (0, 2)
    assert (KNOBS["seed"].low, KNOBS["seed"].high) == (-1, 2**32 - 1)
    assert (KNOBS["repeat_penalty"].low, KNOBS["repeat_penalty"].high) == (0, 10)
    assert (KNOBS["max_tokens"].low, KNOBS["max_tokens"].high) == (1, 1 << 24)


@pytest.mark.parametrize("key, inside, outside", EDGES)
def test_engine_and_server_accept_and_refuse_the_same_values(key, inside, outside):
    assert _sampling_options({key: inside})
    assert sampling_from({key: inside}, 2048)[key] == inside
    with pytest.raises(SamplingError) as engine_error:
        _sampling_options({key: outside})
    assert engine_error.value.key == key
    with pytest.raises(APIError) as server_error:
        sampling_from({key: outside}, 2048)
    assert server_error.value.status == 400 and server_error.value.param == key


@pytest.mark.parametrize("key, inside, outside", EDGES)
def test_a_manifest_refuses_what_the_engine_refuses(tmp_path, key, inside, outside):
    path = tmp_path / "r.toml"
    body = 'name = "r"\ninclude = ["other"]\n[sampling]\n'
    path.write_text(body + f"{key} = {inside}\n")
    assert load_manifest(path).sampling == {key: inside}
    path.write_text(body + f"{key} = {outside}\n")
    with pytest.raises(RoleError, match=rf"^{path}: 'sampling.{key}' must be .* from "):
        load_manifest(path)


@pytest.mark.parametrize("key, inside, outside", [e for e in EDGES if e[0] in ("temperature", "seed", "max_tokens")])
def test_asks_flags_refuse_what_the_engine_refuses_before_loading_a_model(key, outside, inside):
    flag = KNOBS[key].flag
    result = CliRunner().invoke(cli, ["ask", "hi", flag, str(outside)])
    assert result.exit_code == 2 and flag in result.output


def test_non_finite_and_bool_values_are_refused_everywhere():
    for bad in (math.nan, math.inf, True):
        with pytest.raises(SamplingError):
            check_value("temperature", bad)
        with pytest.raises(APIError):
            sampling_from({"temperature": bad}, 2048)
