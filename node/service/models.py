"""The model holder: which classifier serves now, loaded from the registry's serving version
(else `[model].path`), followed without restart when a physicist promotes or rolls back.

A new version is loaded and checked completely before it replaces the old one; a study being
classified keeps the model it started with. Any failure to load, verify or dry-run a model (a
ModelFileError, but also a RuntimeError from a forward that raises, an OSError, a torch error)
falls back to the last good model with a log line naming the file and the reason; with no
loadable model at all, start-up fails with ModelFileError.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from model.classifier import Classifier
from model.export import ModelFileError
from node.runtime import trim_memory
from storage.db import Database
from storage.registry import ModelRecord, serving_model

log = logging.getLogger(__name__)


def load_classifier(path: Path) -> Classifier:
    """Load, verify and prepare one model file; freed load-time copies go back to the OS.
    Whatever goes wrong is raised as ModelFileError naming the file and the reason."""
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


def load_registered(rec: ModelRecord) -> Classifier:
    """A registry version, checked against its entry (weights hash) before anything uses it."""
    clf = load_classifier(Path(rec.path))
    if clf.metadata.weights_sha256 != rec.weights_sha256:
        raise ModelFileError(f"{rec.path}: weights differ from registry entry {rec.version}")
    return clf


class ModelHolder:
    """The served classifier and its registry version (None: `[model].path`)."""

    def __init__(self, db: Database, configured_path: Path) -> None:
        """Load the serving model now; a file that does not load raises ModelFileError."""
        self._db = db
        self._lock = threading.Lock()
        self._failed: str | None = None  # a registry version that did not load: not retried
        self._classifier, self.version = self._initial(configured_path)

    def _initial(self, configured_path: Path) -> tuple[Classifier, str | None]:
        """The registry's serving version if there is one that loads, else [model].path."""
        rec = serving_model(self._db)
        if rec is not None:
            try:
                return load_registered(rec), rec.version
            except ModelFileError as exc:
                log.error("registry model %s (%s) does not load: %s; serving [model].path %s",
                          rec.version, rec.path, exc, configured_path)
                self._failed = rec.version
        return load_classifier(configured_path), None

    def current(self) -> Classifier:
        """The model for the next study; a job keeps the one it started with."""
        with self._lock:
            return self._classifier

    def refresh(self) -> bool:
        """Follow a promotion or rollback: load the new version completely, then swap the
        reference under the lock. True when the served model changed. Never raises."""
        try:
            rec = serving_model(self._db)
        except Exception:  # the scheduler must keep running
            log.exception("model registry check failed")
            return False
        if rec is None or rec.version in (self.version, self._failed):
            return False
        try:
            new = load_registered(rec)
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
