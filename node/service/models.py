"""The model holder: which classifier serves now, and which one runs in shadow beside it,
followed without restart when a physicist promotes, rolls back or starts a shadow trial.

Every model file is verified before anything deserialises it: it must be the registry's copy
in <storage root>/models/ and its whole-file sha256 must be the one the registry recorded
(`storage.registry.verify_model_file`); the weights hash the model carries is checked after
the load. The weights hash alone does not cover a TorchScript file's code: a file with the
same weights and another forward would pass it. `[model].path` is no exception: when the node
falls back to it, the file is first registered (copied into the models directory, by its
bytes, without loading it) and then loaded from that copy like any other version.

A new version is loaded and checked completely before it replaces the old one; a study being
classified keeps the model it started with. Any failure to verify, load or dry-run a model
(a ModelFileError, but also a RuntimeError from a forward that raises, an OSError, a torch
error) keeps the last good model, with a log line naming the file and the reason; with no
loadable model at all, start-up fails with ModelFileError.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from weakref import WeakKeyDictionary

from model.classifier import Classifier
from model.export import METADATA_FILE, ModelFileError, ModelMetadata
from node.runtime import trim_memory
from storage.db import Database
from storage.registry import (
    ModelRecord,
    NewModel,
    RegistryError,
    file_sha256,
    find_by_file_sha256,
    get_model,
    list_models,
    register_model,
    serving_model,
    verify_model_file,
)
from storage.shadow import active_shadow

log = logging.getLogger(__name__)

CONFIGURED_NOTE = "registered from [model].path"
ADOPT_ATTEMPTS = 5  # [model].path registered by several processes at once: look again
ADOPT_RETRY_SECONDS = 0.5
_METADATA_MAX = 1 << 20  # a metadata document is a few KiB


def load_classifier(path: Path) -> Classifier:
    """Load, verify and prepare one model file; freed load-time copies go back to the OS.
    Whatever goes wrong is raised as ModelFileError naming the file and the reason. Callers
    check the file's bytes first (`load_registered`)."""
    try:
        clf = Classifier(path)
    except ModelFileError:
        raise
    except Exception as exc:  # torch raises RuntimeError (and others) from a broken module
        raise ModelFileError(f"{path}: {type(exc).__name__}: {failure_reason(exc)}") from exc
    finally:
        trim_memory()
    return clf


def failure_reason(exc: BaseException) -> str:
    """The last line of an error (a TorchScript error ends with the one that matters), not its
    traceback; at most 300 characters."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def load_registered(root: Path, rec: ModelRecord) -> Classifier:
    """A registry version: its file checked (place and whole-file sha256) before torch sees
    it, unchanged while loading, and its weights hash checked against the entry."""
    try:
        verified = verify_model_file(root, rec)
    except RegistryError as exc:
        raise ModelFileError(str(exc)) from exc
    clf = load_classifier(verified.path)
    if not verified.unchanged():
        raise ModelFileError(f"{verified.path} changed while it was being loaded: refused")
    if clf.metadata.weights_sha256 != rec.weights_sha256:
        raise ModelFileError(f"{rec.path}: weights differ from registry entry {rec.version}")
    return clf


def read_metadata(path: Path) -> ModelMetadata:
    """The metadata a TorchScript file carries, read from its zip archive without loading
    (deserialising) the model: what registering a file needs, before it is trusted."""
    try:
        with zipfile.ZipFile(path) as archive:
            member = next((i for i in archive.infolist()
                           if i.filename.endswith(f"/extra/{METADATA_FILE}")), None)
            if member is None:
                raise ModelFileError(f"model {path} carries no {METADATA_FILE}")
            if member.file_size > _METADATA_MAX:
                raise ModelFileError(f"model {path}: {METADATA_FILE} is too large")
            text = archive.read(member).decode("utf-8")
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError, EOFError) as exc:
        raise ModelFileError(f"{path} is not a readable model file: {exc}") from exc
    try:
        return ModelMetadata.from_json(text)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"model {path}: metadata incomplete: {exc}") from exc


def _safe_version(version: str) -> str:
    """A model file's own version as a registry key (file-name safe)."""
    return re.sub(r"[^A-Za-z0-9._\-]", "_", version).strip("._-")[:64] or "unversioned"


def adopt_configured(db: Database, root: Path, path: Path) -> ModelRecord:
    """`[model].path` as a registry version: the version already registered with exactly
    these bytes, else a new candidate copied into the models directory (never promoted
    here: changing [model].path still changes what an empty registry serves). Worker
    processes starting together may race to register it: the loser finds the winner's."""
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    for _ in range(ADOPT_ATTEMPTS - 1):
        try:
            return _adopt_once(db, root, path)
        except RegistryError:
            time.sleep(ADOPT_RETRY_SECONDS)
    try:
        return _adopt_once(db, root, path)
    except RegistryError as exc:
        raise ModelFileError(f"{path} cannot be registered: {exc}") from exc


def _adopt_once(db: Database, root: Path, path: Path) -> ModelRecord:
    """Found by its bytes, or registered now (RegistryError: another process is at it)."""
    try:
        sha = file_sha256(path)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc}") from exc
    known = find_by_file_sha256(db, sha)
    if known is not None:
        return known
    meta = read_metadata(path)
    taken = {r.version for r in list_models(db)}
    version = _safe_version(meta.version)
    if version in taken:
        version = _safe_version(f"{meta.version}-{sha[:8]}")
    return register_model(db, root, path, NewModel(
        version=version, weights_sha256=meta.weights_sha256,
        data_description=meta.training_data, metrics=meta.metrics, name=meta.name,
        arch=meta.arch, note=CONFIGURED_NOTE))


@dataclass(frozen=True)
class ShadowModel:
    """The version in shadow and its loaded classifier."""

    version: str
    classifier: Classifier


class ModelHolder:
    """The served classifier and its registry version (None: `[model].path`), and the
    shadow one when a trial runs."""

    def __init__(self, db: Database, configured_path: Path, root: Path) -> None:
        """Load the serving model now; a file that does not load raises ModelFileError."""
        self._db = db
        self._root = root
        self._lock = threading.Lock()
        self._failed: str | None = None  # a registry version that did not load: not retried
        self._files: WeakKeyDictionary[Classifier, str] = WeakKeyDictionary()
        self._shadow: ShadowModel | None = None
        self._shadow_failed: str | None = None
        self._classifier, self.version = self._initial(configured_path)
        self.refresh_shadow()

    def _load(self, rec: ModelRecord) -> Classifier:
        clf = load_registered(self._root, rec)
        with self._lock:
            self._files[clf] = rec.file_sha256
        return clf

    def _initial(self, configured_path: Path) -> tuple[Classifier, str | None]:
        """The registry's serving version if there is one that loads, else [model].path
        (from its registered copy)."""
        rec = serving_model(self._db)
        if rec is not None:
            try:
                return self._load(rec), rec.version
            except ModelFileError as exc:
                log.error("registry model %s (%s) does not load: %s; serving [model].path %s",
                          rec.version, rec.path, exc, configured_path)
                self._failed = rec.version
        configured = adopt_configured(self._db, self._root, configured_path)
        try:
            return self._load(configured), None
        except ModelFileError as exc:
            raise ModelFileError(f"[model].path {configured_path} (registered as "
                                 f"{configured.version}): {exc}") from exc

    def current(self) -> Classifier:
        """The model for the next study; a job keeps the one it started with."""
        with self._lock:
            return self._classifier

    def file_sha256(self, clf: Classifier) -> str:
        """The verified whole-file sha256 of a classifier this holder loaded ("" if not)."""
        with self._lock:
            return self._files.get(clf, "")

    def shadow(self) -> ShadowModel | None:
        """The version in shadow now, None when no trial runs (or its file was refused)."""
        with self._lock:
            return self._shadow

    def refresh(self) -> bool:
        """Follow a promotion or rollback: load the new version completely, then swap the
        reference under the lock; then follow the shadow trial. True when the served model
        changed. Never raises."""
        changed = self._refresh_serving()
        self.refresh_shadow()
        return changed

    def _refresh_serving(self) -> bool:
        try:
            rec = serving_model(self._db)
        except Exception:  # the scheduler must keep running
            log.exception("model registry check failed")
            return False
        if rec is None or rec.version in (self.version, self._failed):
            return False
        try:
            new = self._load(rec)
        except Exception as exc:  # load_registered says ModelFileError; anything else too
            log.error("cannot serve model %s (%s): %s; keeping %s", rec.version, rec.path, exc,
                      self.current().metadata.version)
            self._failed = rec.version
            return False
        with self._lock:
            old, self._classifier, self.version = self._classifier, new, rec.version
        log.info("now serving model %s %s (was %s)", new.metadata.name, rec.version,
                 old.metadata.version)
        return True

    def refresh_shadow(self) -> bool:
        """Load the version a shadow trial names (verified like any other), or drop the
        shadow model when the trial stopped. True when it changed. Never raises."""
        try:
            version = active_shadow(self._db)
            current = self.shadow()
            if version is None:
                self._shadow_failed = None  # a trial started again is tried again
            if version == (current.version if current else None) \
                    or (version is not None and version == self._shadow_failed):
                return False
            new = self._load_shadow(version) if version is not None else None
        except Exception:  # the scheduler must keep running
            log.exception("shadow trial check failed")
            return False
        if version is not None and new is None and current is None:
            return False
        with self._lock:
            self._shadow = new
        log.info("shadow model now %s (was %s)", new.version if new else "none",
                 current.version if current else "none")
        return True

    def _load_shadow(self, version: str) -> ShadowModel | None:
        try:
            rec = get_model(self._db, version)
            clf = self._load(rec)
        except (ModelFileError, RegistryError) as exc:
            log.error("cannot run model %s in shadow: %s", version, exc)
            self._shadow_failed = version
            return None
        except Exception as exc:  # a forward that raises, a torch error
            log.error("cannot run model %s in shadow: %s: %s", version, type(exc).__name__,
                      failure_reason(exc))
            self._shadow_failed = version
            return None
        return ShadowModel(version, clf)
