"""Model registry: every trained model, which one is served, and how to go back.

Rows live in the queue database (``storage.db.ModelVersion``, with the other tables) and
model files are copied under ``<storage root>/models/<version>.pt``. A version is
``candidate`` when registered, ``serving`` once promoted (at most one: a partial unique index
keeps it so even with two promoters racing) and ``retired`` after another took its place.
Rollback re-serves the version promoted before the current one and marks the current one as
rolled back, so a second rollback walks further back instead of toggling.

This module knows nothing of TorchScript: callers hand in the version, weights sha256 and
metrics they read from the model file; the registry checks the copy by its file sha256.
The weights sha256 does not cover a TorchScript file's code (a file with the same weights and
another forward has the same weights hash), so a node checks the whole file's sha256
(`verify_model_file`) before anything deserialises it, and loads only from the models
directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.db import Database, ModelState, ModelVersion
from storage.filestore import fsync_dir

log = logging.getLogger(__name__)

MODELS_DIR = "models"
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,63}")
_CHUNK = 1 << 20


class RegistryError(Exception):
    """A registry operation cannot be done (unknown version, nothing to roll back to...)."""


class ModelFileMismatch(RegistryError):
    """A version's file is not the one registered: other bytes, or another place."""


@dataclass(frozen=True)
class VerifiedFile:
    """A model file whose bytes matched the registry, and what identifies those bytes on
    disk: `unchanged()` after loading tells that nothing replaced or rewrote the file
    between the check and the load."""

    path: Path
    sha256: str
    identity: tuple[int, int, int, int]  # device, inode, size, mtime (ns)

    def unchanged(self) -> bool:
        """True when the file is still the one that was hashed."""
        try:
            return _identity(self.path) == self.identity
        except OSError:
            return False


@dataclass(frozen=True)
class ModelRecord:
    """A registry row as plain data (callers never hold ORM objects)."""

    version: str
    name: str
    arch: str
    weights_sha256: str
    file_sha256: str
    path: str
    data_description: str
    metrics: dict[str, Any]
    state: str
    created_at: datetime
    promoted_at: datetime | None
    retired_at: datetime | None
    rolled_back_at: datetime | None
    note: str | None


@dataclass(frozen=True)
class NewModel:
    """What a caller knows about a model file it wants registered."""

    version: str
    weights_sha256: str
    data_description: str
    metrics: Mapping[str, Any]
    name: str = "Dscint"
    arch: str = "dscint"
    note: str | None = None


def _record(row: ModelVersion) -> ModelRecord:
    return ModelRecord(
        version=row.version, name=row.name, arch=row.arch, weights_sha256=row.weights_sha256,
        file_sha256=row.file_sha256, path=row.path, data_description=row.data_description,
        metrics=json.loads(row.metrics or "{}"), state=row.state, created_at=row.created_at,
        promoted_at=row.promoted_at, retired_at=row.retired_at,
        rolled_back_at=row.rolled_back_at, note=row.note)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def verify_model_file(root: Path, rec: ModelRecord) -> VerifiedFile:
    """The version's file, checked before anything loads it: it must be the registry's own
    copy (<root>/models/<version>.pt, no symbolic link) and its bytes must hash to the
    recorded file sha256. ModelFileMismatch names what differs."""
    path = model_file_path(root, rec.version)
    models = (root / MODELS_DIR).resolve()
    if path.is_symlink() or path.resolve().parent != models \
            or Path(rec.path).resolve() != path.resolve():
        raise ModelFileMismatch(f"model {rec.version}: {rec.path} is not the registry's copy "
                                f"{path}; only files in {models} are loaded")
    try:
        with path.open("rb") as fh:
            before = os.fstat(fh.fileno())
            digest = hashlib.sha256()
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise ModelFileMismatch(f"model {rec.version}: cannot read {path}: {exc}") from exc
    sha = digest.hexdigest()
    if sha != rec.file_sha256:
        raise ModelFileMismatch(f"model {rec.version}: {path} has file sha256 {sha[:12]}, "
                                f"the registry recorded {rec.file_sha256[:12]}: refused")
    return VerifiedFile(path, sha, (before.st_dev, before.st_ino, before.st_size,
                                    before.st_mtime_ns))


def find_by_file_sha256(db: Database, sha256: str) -> ModelRecord | None:
    """The version registered with exactly these bytes, if any (the oldest)."""
    with db.read_session() as s:
        row = s.execute(select(ModelVersion).where(ModelVersion.file_sha256 == sha256)
                        .order_by(ModelVersion.id).limit(1)).scalar_one_or_none()
        return _record(row) if row is not None else None


def validate_version(version: str) -> str:
    """Versions become file names: letters, digits, '.', '_', '-' only, at most 64."""
    if not _VERSION_RE.fullmatch(version):
        raise RegistryError(f"model version {version!r} is not a safe file name "
                            "(letters, digits, '.', '_', '-'; at most 64)")
    return version


def model_file_path(root: Path, version: str) -> Path:
    """Where the registry keeps a version's file."""
    return root / MODELS_DIR / f"{validate_version(version)}.pt"


def _durable_copy(src: Path, dest: Path) -> str:
    """Copy via temp file + fsync + rename; returns the sha256 of what was written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
    tmp = Path(name)  # a name of its own: two processes registering at once never share it
    try:
        with src.open("rb") as fin, os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout, _CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    return file_sha256(dest)


def register_model(db: Database, root: Path, src: Path, model: NewModel,
                   now: datetime | None = None) -> ModelRecord:
    """Copy `src` to <root>/models/<version>.pt and record it as a candidate."""
    dest = model_file_path(root, model.version)
    with db.read_session() as s:
        if s.execute(select(ModelVersion.id).where(ModelVersion.version == model.version)
                     ).first() is not None:
            raise RegistryError(f"model version {model.version} is already registered")
    if dest.exists() and dest.resolve() != src.resolve():
        raise RegistryError(f"{dest} exists but version {model.version} is not registered")
    source_sha = file_sha256(src)
    sha = source_sha if dest.resolve() == src.resolve() else _durable_copy(src, dest)
    if sha != source_sha:
        raise RegistryError(f"copy of {src} to {dest} does not match (sha256 {sha[:12]})")
    row = ModelVersion(
        version=model.version, name=model.name, arch=model.arch,
        weights_sha256=model.weights_sha256, file_sha256=sha, path=str(dest),
        data_description=model.data_description,
        metrics=json.dumps(dict(model.metrics), sort_keys=True, default=str),
        state=ModelState.CANDIDATE.value, created_at=now or datetime.now(UTC), note=model.note)
    try:
        with db.session() as s, s.begin():
            s.add(row)
    except IntegrityError as exc:
        raise RegistryError(f"model version {model.version} is already registered") from exc
    log.info("registered model %s (%s, weights sha256 %s) at %s", model.version, model.arch,
             model.weights_sha256[:12], dest)
    return get_model(db, model.version)


def get_model(db: Database, version: str) -> ModelRecord:
    """One version; RegistryError if unknown."""
    with db.read_session() as s:
        row = s.execute(select(ModelVersion).where(ModelVersion.version == version)
                        ).scalar_one_or_none()
        if row is None:
            raise RegistryError(f"no model version {version!r} in the registry")
        return _record(row)


def list_models(db: Database) -> list[ModelRecord]:
    """All versions, oldest first."""
    with db.read_session() as s:
        rows = s.execute(select(ModelVersion).order_by(ModelVersion.created_at,
                                                       ModelVersion.id)).scalars().all()
        return [_record(r) for r in rows]


def serving_model(db: Database) -> ModelRecord | None:
    """The version to serve now, or None when nothing was ever promoted."""
    with db.read_session() as s:
        row = s.execute(select(ModelVersion).where(
            ModelVersion.state == ModelState.SERVING.value)).scalar_one_or_none()
        return _record(row) if row is not None else None


def _retire_serving(s: Session, when: datetime) -> None:
    s.execute(update(ModelVersion).where(ModelVersion.state == ModelState.SERVING.value)
              .values(state=ModelState.RETIRED.value, retired_at=when)
              .execution_options(synchronize_session=False))


def promote(db: Database, version: str, note: str | None = None,
            now: datetime | None = None) -> ModelRecord:
    """Serve `version`; the one served before is retired, in one transaction."""
    when = now or datetime.now(UTC)
    with db.session() as s, s.begin():
        row = s.execute(select(ModelVersion).where(ModelVersion.version == version)
                        ).scalar_one_or_none()
        if row is None:
            raise RegistryError(f"no model version {version!r} in the registry")
        if row.state == ModelState.SERVING.value:
            return _record(row)
        _retire_serving(s, when)
        s.flush()
        row.state = ModelState.SERVING.value
        row.promoted_at = when
        row.rolled_back_at = None
        if note:
            row.note = note
    log.info("model %s promoted to serving", version)
    return get_model(db, version)


def rollback(db: Database, now: datetime | None = None) -> ModelRecord:
    """Serve the version promoted before the current one; the current one is rolled back."""
    when = now or datetime.now(UTC)
    with db.session() as s, s.begin():
        current = s.execute(select(ModelVersion).where(
            ModelVersion.state == ModelState.SERVING.value)).scalar_one_or_none()
        if current is None:
            raise RegistryError("no model is serving: nothing to roll back")
        previous = s.execute(
            select(ModelVersion)
            .where(ModelVersion.state == ModelState.RETIRED.value,
                   ModelVersion.promoted_at.is_not(None),
                   ModelVersion.rolled_back_at.is_(None),
                   ModelVersion.id != current.id)
            .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc())
            .limit(1)).scalar_one_or_none()
        if previous is None:
            raise RegistryError(f"model {current.version} is the only one ever served: "
                                "nothing to roll back to")
        current.state = ModelState.RETIRED.value
        current.retired_at = when
        current.rolled_back_at = when
        s.flush()
        previous.state = ModelState.SERVING.value
        previous.promoted_at = when
        version = previous.version
        log.info("rolled back from model %s to %s", current.version, version)
    return get_model(db, version)
