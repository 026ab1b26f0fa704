"""Verified model files on real TorchScript files and a real SQLite registry: a file with the
registered weights but other code (it calls every study bone metastasis at probability 1.0),
a truncated file and a file outside the models directory are refused at start-up, hot swap
and shadow, with a log line, and the last good model keeps serving; [model].path is served
from its registered copy; the SR names the verified file hash."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import update

from model.classifier import Classifier
from model.export import ModelFileError, load_torchscript
from node.service.models import ModelHolder, adopt_configured, read_metadata
from storage.db import Database
from storage.registry import (
    ModelFileMismatch,
    ModelVersion,
    NewModel,
    file_sha256,
    get_model,
    model_file_path,
    promote,
    register_model,
    verify_model_file,
)
from storage.shadow import start_shadow
from tests.support.tiny_models import export_tampered, export_tiny, truncate

LOGGER = "node.service.models"
STUDY = [("anterior", np.full((1024, 256), 50.0)), ("posterior", np.full((1024, 256), 40.0))]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    d = Database(f"sqlite:///{tmp_path / 'node.db'}")
    d.create_all()
    yield d
    d.dispose()


def _register(db: Database, root: Path, src: Path, version: str) -> None:
    meta = read_metadata(src)
    register_model(db, root, src, NewModel(version=version, weights_sha256=meta.weights_sha256,
                                           data_description="tiny", metrics={}))


def _tamper(root: Path, version: str, seed: int, tmp_path: Path) -> Path:
    """Replace the registry's copy of `version` by the same weights with other code."""
    dest = model_file_path(root, version)
    forged = export_tampered(tmp_path / "forged" / f"{version}.pt", seed=seed,
                             version=read_metadata(dest).version)
    assert load_torchscript(forged)[1].weights_sha256 == load_torchscript(dest)[1].weights_sha256
    shutil.copyfile(forged, dest)
    return dest


def test_metadata_is_read_without_loading_and_configured_path_is_served_from_its_copy(
        db: Database, tmp_path: Path) -> None:
    root = tmp_path / "node"
    configured = export_tiny(tmp_path / "in" / "configured.pt", seed=1, version="cfg 1")
    assert read_metadata(configured).version == "cfg 1"
    holder = ModelHolder(db, configured, root)
    rec = adopt_configured(db, root, configured)  # the same bytes: the same version again
    assert rec.version == "cfg_1" and rec.state == "candidate" and rec.note
    copy = model_file_path(root, "cfg_1")
    assert copy.read_bytes() == configured.read_bytes()
    assert holder.version is None  # [model].path serves (from its registered copy)
    assert holder.current().path == copy
    assert holder.file_sha256(holder.current()) == file_sha256(configured)
    # another file at [model].path with the same version inside: registered apart
    configured.unlink()
    export_tiny(configured, seed=2, version="cfg 1")
    other = adopt_configured(db, root, configured)
    assert other.version.startswith("cfg_1-") and other.file_sha256 == file_sha256(configured)
    with pytest.raises(ModelFileError, match="not a readable model file"):
        read_metadata(truncate(configured))


def test_start_up_refuses_a_tampered_or_truncated_serving_file(
        db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "node"
    configured = export_tiny(tmp_path / "in" / "configured.pt", seed=1, version="cfg-1")
    _register(db, root, export_tiny(tmp_path / "in" / "v1.pt", seed=3, version="v1"), "v1")
    promote(db, "v1")
    assert ModelHolder(db, configured, root).version == "v1"  # intact: served

    forged = _tamper(root, "v1", seed=3, tmp_path=tmp_path)
    # what the forged file would say if it were loaded: the check below is what stops it
    assert Classifier(forged).classify_study(STUDY).probabilities["bone_metastasis"] == 1.0
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        holder = ModelHolder(db, configured, root)
    assert holder.version is None and holder.current().metadata.version == "cfg-1"
    assert holder.current().classify_study(STUDY).probabilities["bone_metastasis"] < 0.99
    line, = [r.getMessage() for r in caplog.records if "v1" in r.getMessage()]
    assert "file sha256" in line and "refused" in line and "serving [model].path" in line

    caplog.clear()
    truncate(model_file_path(root, "v1"))
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        holder = ModelHolder(db, configured, root)
    assert holder.version is None
    line, = [r.getMessage() for r in caplog.records if "v1" in r.getMessage()]
    assert "file sha256" in line and "refused" in line


def test_hot_swap_refuses_tampered_and_truncated_files_and_keeps_serving(
        db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "node"
    configured = export_tiny(tmp_path / "in" / "configured.pt", seed=1)
    _register(db, root, export_tiny(tmp_path / "in" / "good.pt", seed=4, version="good"),
              "good")
    promote(db, "good")
    holder = ModelHolder(db, configured, root)
    assert holder.version == "good"
    before = holder.current().classify_study(STUDY).probabilities

    _register(db, root, export_tiny(tmp_path / "in" / "v2.pt", seed=5, version="v2"), "v2")
    _tamper(root, "v2", seed=5, tmp_path=tmp_path)
    _register(db, root, export_tiny(tmp_path / "in" / "v3.pt", seed=6, version="v3"), "v3")
    truncate(model_file_path(root, "v3"))
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        promote(db, "v2")
        assert not holder.refresh()
        promote(db, "v3")
        assert not holder.refresh()
    lines = [r.getMessage() for r in caplog.records if "cannot serve model" in r.getMessage()]
    assert len(lines) == 2
    assert "v2.pt" in lines[0] and "file sha256" in lines[0] and "keeping good" in lines[0]
    assert "v3.pt" in lines[1] and "file sha256" in lines[1] and "keeping good" in lines[1]
    assert holder.version == "good"
    assert holder.current().classify_study(STUDY).probabilities == before


def test_shadow_refuses_a_tampered_file_and_serving_is_untouched(
        db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "node"
    configured = export_tiny(tmp_path / "in" / "configured.pt", seed=1)
    holder = ModelHolder(db, configured, root)
    _register(db, root, export_tiny(tmp_path / "in" / "cand.pt", seed=7, version="cand"),
              "cand")
    _tamper(root, "cand", seed=7, tmp_path=tmp_path)
    start_shadow(db, "cand")
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        holder.refresh()
    assert holder.shadow() is None
    line, = [r.getMessage() for r in caplog.records if "shadow" in r.getMessage()]
    assert "cannot run model cand in shadow" in line and "file sha256" in line
    assert holder.current().metadata.version == "tiny-0"

    _register(db, root, export_tiny(tmp_path / "in" / "ok.pt", seed=8, version="ok"), "ok")
    start_shadow(db, "ok")
    holder.refresh()
    shadow = holder.shadow()
    assert shadow is not None and shadow.version == "ok"
    assert holder.file_sha256(shadow.classifier) == file_sha256(model_file_path(root, "ok"))


def test_only_the_models_directory_is_loaded(db: Database, tmp_path: Path) -> None:
    root = tmp_path / "node"
    _register(db, root, export_tiny(tmp_path / "in" / "v1.pt", seed=3, version="v1"), "v1")
    elsewhere = tmp_path / "elsewhere.pt"
    shutil.copyfile(model_file_path(root, "v1"), elsewhere)
    with db.session() as s, s.begin():
        s.execute(update(ModelVersion).values(path=str(elsewhere)))
    with pytest.raises(ModelFileMismatch, match="only files in"):
        verify_model_file(root, get_model(db, "v1"))
    with db.session() as s, s.begin():  # back in place, but a symbolic link to elsewhere
        s.execute(update(ModelVersion).values(path=str(model_file_path(root, "v1"))))
    model_file_path(root, "v1").unlink()
    model_file_path(root, "v1").symlink_to(elsewhere)
    with pytest.raises(ModelFileMismatch, match="only files in"):
        verify_model_file(root, get_model(db, "v1"))
    model_file_path(root, "v1").unlink()
    with pytest.raises(ModelFileMismatch, match="cannot read"):
        verify_model_file(root, get_model(db, "v1"))


def test_a_file_replaced_after_its_check_is_noticed(db: Database, tmp_path: Path) -> None:
    """The bytes are hashed, then torch loads the path: a file renamed over it or rewritten
    in between has another inode, size or time, and the load is refused."""
    root = tmp_path / "node"
    _register(db, root, export_tiny(tmp_path / "in" / "v1.pt", seed=3, version="v1"), "v1")
    checked = verify_model_file(root, get_model(db, "v1"))
    assert checked.unchanged()
    replacement = export_tampered(tmp_path / "forged.pt", seed=3, version="v1")
    replacement.replace(model_file_path(root, "v1"))
    assert not checked.unchanged()
