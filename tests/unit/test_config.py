"""specdec.config (flags with environment fallbacks) and specdec.openmp (the model processes' environment)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specdec.config import check_ports, env_name, parse_config

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class _Config:
    """A test config."""

    port: int = 50051
    address: str = "127.0.0.1:1"
    ratio: float = 0.5
    verbose: bool = False


def test_flags_override_env_which_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_config(_Config, []) == _Config()
    monkeypatch.setenv("SPECDEC_PORT", "7")
    monkeypatch.setenv("SPECDEC_VERBOSE", "true")
    assert parse_config(_Config, []) == _Config(port=7, verbose=True)
    assert parse_config(_Config, ["--port", "9", "--no-verbose", "--ratio", "0.25"]) == _Config(port=9, ratio=0.25)
    assert env_name("--draft-address") == "SPECDEC_DRAFT_ADDRESS"
    monkeypatch.setenv("SPECDEC_OTHER_PORT", "11")
    assert parse_config(_Config, [], env_prefix="SPECDEC_OTHER_") == _Config(port=11)


def test_each_model_process_starts_with_its_own_openmp_spin_unless_one_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.stack import child_env
    from specdec.openmp import DRAFT_SPINCOUNT, TARGET_SPINCOUNT
    from target_service.launcher import triton_env

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert "GOMP_SPINCOUNT" not in child_env()  # the stack leaves it to each service
    assert triton_env()["GOMP_SPINCOUNT"] == TARGET_SPINCOUNT
    draft = subprocess.run(  # the draft service sets its own as its entry point is imported, before torch
        [sys.executable, "-c", "import os, draft_service.__main__; print(os.environ['GOMP_SPINCOUNT'])"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
    )
    assert draft.stdout.split()[-1] == DRAFT_SPINCOUNT != TARGET_SPINCOUNT
    monkeypatch.setenv("GOMP_SPINCOUNT", "12345")  # an operator's own value wins
    assert child_env()["GOMP_SPINCOUNT"] == triton_env()["GOMP_SPINCOUNT"] == "12345"


@dataclasses.dataclass(frozen=True)
class _Inner:
    """Nested settings."""

    dtype: str = "float32"
    threads: int = 0


@dataclasses.dataclass(frozen=True)
class _Outer:
    """A config holding another one."""

    port: int = 1
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_a_nested_dataclass_field_contributes_its_own_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_config(_Outer, []) == _Outer()
    monkeypatch.setenv("SPECDEC_THREADS", "3")
    assert parse_config(_Outer, ["--dtype", "bfloat16", "--port", "2"]) == _Outer(2, _Inner("bfloat16", 3))


@dataclasses.dataclass(frozen=True)
class _Checked:
    """A config that checks itself, as every service's does."""

    port: int = 1

    def __post_init__(self) -> None:
        check_ports(self, "port")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--port", "65536"], {}, "port must be in [0, 65535], got 65536"),  # grpc would bind 65536 mod 65536
        (["--port", "-1"], {}, "port must be in [0, 65535], got -1"),
        (["--port", "x"], {}, "argument --port: invalid int value: 'x'"),
        ([], {"SPECDEC_PORT": "x"}, "SPECDEC_PORT='x' is not a valid int (for --port)"),
    ],
    ids=["too-high", "negative", "not-a-number", "env-not-a-number"],
)
def test_a_bad_value_is_a_usage_error_not_a_traceback(monkeypatch, capsys, argv, env, message) -> None:
    assert parse_config(_Checked, ["--port", "65535"]) == _Checked(65535)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        parse_config(_Checked, argv, prog="svc")
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"svc: error: {message}" in err and "Traceback" not in err, err
