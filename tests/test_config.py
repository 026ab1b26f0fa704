"""config.toml: documented defaults, validation naming the key, CLI exit code."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.__main__ import main
from node.config import CallerRule, Config, ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_equals_embedded_defaults() -> None:
    cfg = load_config(REPO / "config.toml")
    defaults = Config()
    for section in ("node", "pacs", "export", "storage", "model", "completion", "logging"):
        assert getattr(cfg, section) == getattr(defaults, section), section
    assert cfg.node.ae_title == "DSCINT" and cfg.node.port == 11112
    assert cfg.database_url == f"sqlite:///{REPO / 'var/dscint/dscint.db'}"


@pytest.mark.parametrize("doc, key", [
    ({"node": {"prot": 1}}, "[node].prot"),
    ({"node": {"port": "11112"}}, "[node].port"),
    ({"node": {"port": 70000}}, "[node].port"),
    ({"pacs": {"port": True}}, "[pacs].port"),
    ({"completion": {"quiet_seconds": "soon"}}, "[completion].quiet_seconds"),
    ({"node": {"allowed_callers": "CAMERA"}}, "[node].allowed_callers"),
    ({"node": {"allowed_callers": ["@10.0.0.1"]}}, "[node].allowed_callers"),
    ({"node": {"ae_title": "A_TITLE_MUCH_TOO_LONG"}}, "[node].ae_title"),
    ({"nodes": {}}, "[nodes]"),
    ({"logging": {"level": "LOUD"}}, "[logging].level"),
])
def test_invalid_config_names_the_key(doc: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(doc)
    assert key in str(err.value)


def test_ints_accepted_for_floats_and_paths_relative_to_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[completion]\nquiet_seconds = 30\n[storage]\nroot = "data"\n'
                 '[model]\npath = "m/dscint.pt"\n')
    cfg = load_config(f)
    assert cfg.completion.quiet_seconds == 30.0
    assert cfg.storage_root == tmp_path / "data"
    assert cfg.model_path == tmp_path / "m" / "dscint.pt"
    assert cfg.database_url == f"sqlite:///{tmp_path / 'data' / 'dscint.db'}"


def test_caller_rules_with_and_without_host() -> None:
    assert CallerRule.parse("CAM1").allows("CAM1", "10.0.0.9")
    pinned = CallerRule.parse("CAM1@10.0.0.5")
    assert pinned.allows("CAM1", "10.0.0.5")
    assert not pinned.allows("CAM1", "10.0.0.6")
    assert not pinned.allows("CAM2", "10.0.0.5")


def test_cli_stops_with_message_naming_the_key(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[node]\nae_titel = 'X'\n")
    assert main(["serve", "--config", str(f)]) == 2
    assert "[node].ae_titel" in capsys.readouterr().err
    assert main(["status", "--config", str(tmp_path / "missing.toml")]) == 2
