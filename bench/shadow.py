"""Shadow trials: what a candidate in shadow costs per study, and what it adds to the serving
path.

The node runs as its own process (`python -m node serve`) with the full-size untrained Dscint;
studies (both views) are sent one after another, each after the previous SR arrived, first
with no trial, then with a second full-size Dscint (other seed) in shadow. Reported: the
study latency (last instance sent -> SR acknowledged by the PACS stand-in) in both phases,
and the shadow model's own latency per study as stored in `shadow_results`. With studies sent
back to back the shadow run of one study overlaps the serving run of the next: the difference
in study latency is what the trial adds on this machine's cores.
`python -m bench.shadow [--studies 20]`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

from bench.common import start_bench_node
from model.classes import CLASS_NAMES
from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.config import load_config
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.export.scu import Destination
from storage.db import Database
from storage.shadow import shadow_summary
from tests.support.nodeproc import REPO

_EXPORT = ("import sys; from pathlib import Path; from tests.conftest import export_untrained; "
           "export_untrained(Path(sys.argv[1]), seed=int(sys.argv[2]), version=sys.argv[3])")
_REGISTER = ("import sys; from pathlib import Path; from node.config import load_config; "
             "from node.service.models import read_metadata; from storage.db import Database; "
             "from storage.registry import NewModel, register_model; "
             "cfg = load_config(Path(sys.argv[1])); db = Database(cfg.database_url); "
             "db.create_all(); m = read_metadata(Path(sys.argv[2])); "
             "register_model(db, cfg.storage_root, Path(sys.argv[2]), NewModel(sys.argv[3], "
             "m.weights_sha256, m.training_data, {}))")


def _export(path: Path, seed: int, version: str) -> Path:
    """A full-size untrained Dscint, exported in a child process (this one never maps
    libtorch)."""
    subprocess.run([sys.executable, "-c", _EXPORT, str(path), str(seed), version], cwd=REPO,
                   check=True)
    return path


def _run(studies: list[list[Path]], dest: Destination, pacs: PacsStandIn) -> list[float]:
    """Send each study after the previous SR arrived; seconds from sent to SR acknowledged."""
    out = []
    for paths in studies:
        uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        if send_paths(paths, dest, "BENCH_CAM") != [0] * len(paths):
            raise RuntimeError("node refused a study")
        sent = time.time()
        deadline = time.monotonic() + 60
        while uid not in pacs.by_study() and time.monotonic() < deadline:
            time.sleep(0.002)
        out.append(pacs.by_study()[uid][0].acknowledged_at - sent)
    return out


def _row(name: str, values: list[float]) -> str:
    return (f"| {name} | {len(values)} | {statistics.median(values) * 1000:.0f} | "
            f"{max(values) * 1000:.0f} |")


def main() -> None:
    """Run both phases and print a table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=20, help="studies per phase")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dscint-shadow-") as tmp:
        work = Path(tmp)
        studies = [write_study(generate_study(CLASS_NAMES[i % 4], seed=80_000 + i),
                               work / f"s{i}", DicomLayout.MULTIFRAME)
                   for i in range(2 * args.studies)]
        serving = _export(work / "serving.pt", 0, "serving")
        candidate = _export(work / "candidate.pt", 1, "candidate")
        pacs = PacsStandIn(ae_title="BENCH_PACS")
        pacs.start()
        node = start_bench_node(work, serving, pacs.port)
        cfg_file = work / "config.toml"
        dest = Destination("DSCINT", "127.0.0.1", node.port)
        try:
            time.sleep(2.0)
            without = _run(studies[:args.studies], dest, pacs)
            subprocess.run([sys.executable, "-c", _REGISTER, str(cfg_file), str(candidate),
                            "candidate"], cwd=REPO, check=True)
            subprocess.run([sys.executable, "-m", "node", "models", "shadow", "candidate",
                            "--config", str(cfg_file)], cwd=REPO, check=True,
                           capture_output=True)
            time.sleep(15.0)  # the node checks the registry every 5 s and loads the model
            with_shadow = _run(studies[args.studies:], dest, pacs)
            time.sleep(10.0)  # the last study's shadow run
            db = Database(load_config(cfg_file).database_url)
            s = shadow_summary(db, "candidate")
            db.dispose()
        finally:
            node.stop()
            pacs.stop()
    print("| phase | studies | median ms | max ms |")
    print("| --- | --- | --- | --- |")
    print(_row("study latency, no trial", without))
    print(_row("study latency, candidate in shadow", with_shadow))
    print(f"| shadow latency per study (stored) | {s.studies} (failed {s.failed}) | "
          f"{s.median_ms or 0:.0f} | p95 {s.p95_ms or 0:.0f} |")
    print(f"\nadded to the median study latency: "
          f"{(statistics.median(with_shadow) - statistics.median(without)) * 1000:+.0f} ms; "
          f"shadowed {s.studies} of {len(with_shadow)} studies")


if __name__ == "__main__":
    main()
