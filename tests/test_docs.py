"""The README stays true: its set-up commands, config reference and example config."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from proxy.app.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _config_keys() -> set[str]:
    keys = set()
    for f in dataclasses.fields(Config):
        value = getattr(Config(), f.name)
        if dataclasses.is_dataclass(value):
            keys |= {f"{f.name}.{sub.name}" for sub in dataclasses.fields(value)}
        else:
            keys.add(f.name)
    return keys


def test_every_config_key_is_documented_and_nothing_else() -> None:
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", README, flags=re.M))
    assert documented == _config_keys()


def test_example_config_loads_and_sets_every_section() -> None:
    config = load_config(ROOT / "deploy" / "linkedge.example.toml", environ={})
    assert config.backend.url and config.edge.cname_target
    text = (ROOT / "deploy" / "linkedge.example.toml").read_text()
    for key in _config_keys():
        assert key.split(".")[-1] in text, key


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    section = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.+?)\n```", section, flags=re.S)
    assert len(commands) == 2
    demo, tests = commands
    assert "linkedge demo" in demo
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.strip() in ci
