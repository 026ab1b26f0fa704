"""Shared fixtures: real TorchScript models (untrained, full size) and the real GE scan folder."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model.dscint import Dscint, DscintProbabilities
from model.export import ModelMetadata, export_torchscript
from node.demo.pacs_standin import PacsStandIn
from storage.db import Database
from tests.support.pg import fresh_database
from tests.support.pki import Pki, make_pki

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata" / "wg04-nm1"


def export_untrained(path: Path, seed: int = 0, version: str = "test-0") -> Path:
    """A full-size Dscint with seeded random weights, exported as the node would load it."""
    torch.manual_seed(seed)
    meta = ModelMetadata(version=version, weights_sha256="",
                         training_data="untrained (random weights) test model",
                         trained_on_phantoms=True)
    return export_torchscript(DscintProbabilities(Dscint()), path, meta)


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One exported model shared by the whole session (exporting takes ~1 s)."""
    return export_untrained(tmp_path_factory.mktemp("model") / "dscint.pt")


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The eight encodings of the real GE scan; skip where ../shared/realdata is absent."""
    if not REALDATA.is_dir():
        pytest.skip(f"real GE scan folder {REALDATA} is absent")
    return REALDATA


@pytest.fixture
def pacs() -> Iterator[PacsStandIn]:
    """A PACS stand-in on a port the OS picks, AE TEST_PACS, stopped after the test."""
    p = PacsStandIn(ae_title="TEST_PACS")
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Test certificates (tests/support/pki.py); skipped without the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh queue database: an SQLite file in tmp_path, or a new database of its own on
    the test PostgreSQL server (tests/support/pg.py: skipped without one, failed under
    DSCINT_REQUIRE_POSTGRES=1)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'queue.db'}"
        return
    with fresh_database() as url:
        yield url


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """A fresh queue database on `database_url` (both engines), tables created. Modules
    whose tests need SQLite only define their own."""
    d = Database(database_url)
    d.create_all()
    yield d
    d.dispose()
