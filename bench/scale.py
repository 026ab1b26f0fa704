"""Studies per minute with 1, 2 and 3 worker processes (`python -m node worker`) behind one
receiver (`python -m node receive`) on one PostgreSQL queue, all on this machine.

    DSCINT_TEST_POSTGRES_URL=$(bash .ci/postgres.sh) .venv/bin/python -m bench.scale

Each run gets a fresh database and store. The receiver takes every study first (from 3
senders at once), then the workers start together and drain the queue: the rate counts the
studies finished after the last worker was up, over the time from then to the last finished
job (the database's timestamps), so receiving and start-up (loading torch and the model, which
competes for the same cores) are not counted. Workers use one torch
thread each, so on a machine with C cores the CPU is the ceiling beyond C workers (on 2 cores
the third worker adds nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select

from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.export.scu import Destination
from storage.db import Database, Job
from tests.support.net import NODE_AE
from tests.support.nodeproc import export_model
from tests.support.pg import URL_ENV, fresh_database
from tests.support.roles import RoleProc, phantom_studies

SENDERS = 3


def _send(studies: list[tuple[str, list[Path]]], to: Destination) -> None:
    """The studies from SENDERS modalities at once (round robin)."""
    threads = [threading.Thread(target=lambda k=k: [send_paths(ps, to, f"SENDER{k + 1}")
                                                    for _, ps in studies[k::SENDERS]])
               for k in range(SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _finished_after(url: str, t0: datetime) -> tuple[int, float]:
    """Classify jobs finished after t0, and seconds from t0 to the last one."""
    db = Database(url)
    try:
        with db.read_session() as s:
            n, last = s.execute(select(func.count(), func.max(Job.finished_at))
                                .where(Job.finished_at > t0)).one()
    finally:
        db.dispose()
    if not n or last is None:
        raise RuntimeError("every study was finished before the last worker was up: "
                           "use more --studies")
    return int(n), float((last - t0).total_seconds())


def run(workers: int, n_studies: int, model: Path, work: Path) -> dict[str, float]:
    """One receiver and `workers` workers on a fresh database; studies per minute."""
    work.mkdir(parents=True, exist_ok=True)
    pacs = PacsStandIn(ae_title="TEST_PACS")
    pacs.start()
    procs: list[RoleProc] = []
    try:
        with fresh_database("scale") as url:
            def make(role: str, name: str) -> RoleProc:
                return RoleProc.make(role, work, name, database=url, model=model,
                                     pacs_port=pacs.port, root=work / "store")
            receiver = make("receive", "receive0").start()
            procs.append(receiver)
            studies = phantom_studies(work / "studies", n_studies, seed=900)
            _send(studies, Destination(NODE_AE, "127.0.0.1", receiver.port))
            pool = [make("worker", f"worker{i}") for i in range(workers)]
            procs += pool
            threads = [threading.Thread(target=w.start) for w in pool]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            t0 = datetime.now(UTC)  # every worker is up
            if not pacs.wait_for(n_studies, timeout=60 + 30 * n_studies):
                raise RuntimeError(f"only {len(pacs.srs)} of {n_studies} SRs arrived")
            counted, elapsed = _finished_after(url, t0)
            for p in procs:
                p.stop()
    finally:
        for p in procs:
            p.stop()
        pacs.stop()
    return {"workers": workers, "studies": counted, "seconds": round(elapsed, 1),
            "studies_per_minute": round(60 * counted / elapsed, 1)}


def main() -> int:
    """Run 1, 2, 3 workers (or --workers); print one line each, then JSON."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--studies", type=int, default=80)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    args = p.parse_args()
    if not os.environ.get(URL_ENV):
        print(f"set {URL_ENV} (e.g. {URL_ENV}=$(bash .ci/postgres.sh))", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="dscint-scale-") as tmp:
        model = export_model(Path(tmp) / "dscint.pt")
        for n in args.workers:
            row = run(n, args.studies, model, Path(tmp) / f"w{n}")
            print(f"{n} worker(s): {row['studies']} studies (after all were up) in "
                  f"{row['seconds']} s = "
                  f"{row['studies_per_minute']} studies/min", flush=True)
            rows.append(row)
    print(json.dumps({"cpu_count": os.cpu_count(), "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
