"""Model registry on a real SQLite file: register, promote, rollback, listing, file copies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from storage.db import Database
from storage.registry import (
    ModelFileMismatch,
    ModelState,
    NewModel,
    RegistryError,
    file_sha256,
    find_by_file_sha256,
    get_model,
    list_models,
    model_file_path,
    promote,
    register_model,
    rollback,
    serving_model,
    verify_model_file,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    d = Database(f"sqlite:///{tmp_path / 'node.db'}")
    d.create_all()  # the registry table comes with storage.db.Base
    return d


def _model_file(tmp_path: Path, name: str, payload: bytes) -> Path:
    p = tmp_path / "incoming" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(payload)
    return p


def _register(db: Database, root: Path, tmp_path: Path, version: str, minute: int = 0
              ) -> None:
    src = _model_file(tmp_path, f"{version}.bin", f"weights of {version}".encode())
    register_model(db, root, src, NewModel(version=version, weights_sha256=f"sha-{version}",
                                           data_description="phantoms",
                                           metrics={"study_f1": 0.5 + minute / 100}),
                   now=T0 + timedelta(minutes=minute))


def test_register_copies_file_and_records_candidate(db: Database, tmp_path: Path) -> None:
    root = tmp_path / "store"
    src = _model_file(tmp_path, "m.pt", b"some model bytes")
    rec = register_model(db, root, src, NewModel(version="2025.01.01-000000",
                                                 weights_sha256="abc", data_description="d",
                                                 metrics={"study_f1": 0.75}, arch="dscint"))
    dest = model_file_path(root, "2025.01.01-000000")
    assert Path(rec.path) == dest and dest.read_bytes() == b"some model bytes"
    assert rec.file_sha256 == file_sha256(src)
    assert rec.state == ModelState.CANDIDATE and rec.metrics == {"study_f1": 0.75}
    assert serving_model(db) is None
    assert not list((root / "models").glob("*.partial"))


def test_register_refuses_duplicates_and_unsafe_versions(db: Database, tmp_path: Path) -> None:
    root = tmp_path / "store"
    _register(db, root, tmp_path, "v1")
    with pytest.raises(RegistryError, match="already registered"):
        _register(db, root, tmp_path, "v1")
    with pytest.raises(RegistryError, match="safe file name"):
        _register(db, root, tmp_path, "../evil")


def test_register_in_place_does_not_copy(db: Database, tmp_path: Path) -> None:
    root = tmp_path / "store"
    dest = model_file_path(root, "v9")
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"exported straight into the registry folder")
    rec = register_model(db, root, dest, NewModel("v9", "sha", "d", {}))
    assert Path(rec.path) == dest and rec.file_sha256 == file_sha256(dest)


def test_promote_retires_previous_and_rollback_walks_back(db: Database, tmp_path: Path) -> None:
    root = tmp_path / "store"
    for i, v in enumerate(("v1", "v2", "v3")):
        _register(db, root, tmp_path, v, minute=i)
    promote(db, "v1", now=T0 + timedelta(hours=1))
    promote(db, "v2", now=T0 + timedelta(hours=2))
    promote(db, "v3", now=T0 + timedelta(hours=3))
    states = {r.version: r.state for r in list_models(db)}
    assert states == {"v1": "retired", "v2": "retired", "v3": "serving"}
    assert rollback(db, now=T0 + timedelta(hours=4)).version == "v2"
    assert get_model(db, "v3").rolled_back_at is not None
    assert rollback(db, now=T0 + timedelta(hours=5)).version == "v1"  # not back to v3
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        rollback(db)
    promote(db, "v3")  # a rolled-back version can be served again by hand
    assert serving_model(db) is not None and serving_model(db).version == "v3"  # type: ignore
    assert get_model(db, "v3").rolled_back_at is None
    assert sum(r.state == "serving" for r in list_models(db)) == 1


def test_errors_name_what_is_wrong(db: Database, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="nothing to roll back"):
        rollback(db)
    with pytest.raises(RegistryError, match="no model version 'nope'"):
        promote(db, "nope")
    with pytest.raises(RegistryError, match="no model version"):
        get_model(db, "nope")


def test_promoting_the_serving_version_is_a_no_op(db: Database, tmp_path: Path) -> None:
    _register(db, tmp_path / "store", tmp_path, "v1")
    first = promote(db, "v1")
    again = promote(db, "v1")
    assert first.promoted_at == again.promoted_at and again.state == "serving"


def test_a_version_is_found_by_its_bytes_and_its_file_checked_by_them(db: Database,
                                                                        tmp_path: Path) -> None:
    """The whole-file sha256 is what identifies and guards a file (the weights hash the
    caller hands in does not cover a TorchScript file's code)."""
    root = tmp_path / "store"
    _register(db, root, tmp_path, "v1")
    rec = get_model(db, "v1")
    found = find_by_file_sha256(db, file_sha256(model_file_path(root, "v1")))
    assert found is not None and found.version == "v1"
    assert find_by_file_sha256(db, "0" * 64) is None
    checked = verify_model_file(root, rec)
    assert checked.sha256 == rec.file_sha256 and checked.unchanged()
    model_file_path(root, "v1").write_bytes(b"weights of v1 but other code")
    assert not checked.unchanged()
    with pytest.raises(ModelFileMismatch, match=r"file sha256 .* the registry recorded"):
        verify_model_file(root, rec)
    with pytest.raises(ModelFileMismatch, match="only files in"):
        verify_model_file(tmp_path / "another-root", rec)
