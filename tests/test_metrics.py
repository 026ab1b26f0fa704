"""/metrics with prometheus-client: counters and histograms beside the historical gauges, and
the receiver process's C-STORE counts relayed over its pipe to the one endpoint."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from pydicom import dcmread

from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.receive.process import ReceiverProcess, stored_line
from node.service.health import Metrics, metrics_text
from node.service.node import Node
from tests.support.net import free_port
from tests.support.nodes import CALLER, dest, node_config, wait_study


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as rsp:
        assert rsp.status == 200
        return rsp.read().decode()


def value(text: str, series: str) -> float:
    """The sample's value; AssertionError naming the series when it is absent."""
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert m is not None, f"{series} not in /metrics:\n{text}"
    return float(m.group(1))


def test_receiver_process_counts_reach_the_one_endpoint(tmp_path: Path, untrained_model: Path,
                                                        pacs: PacsStandIn) -> None:
    port = free_port()
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      node={"receiver_process": True}, health={"port": port},
                      results={"image": False, "pdf": False})  # one export: counts exact
    paths = write_study(generate_study("normal", seed=11), tmp_path / "out",
                        DicomLayout.MULTIFRAME)
    with Node(cfg) as n:
        assert n.receiver_pid is not None
        assert send_paths(paths, dest(n), CALLER) == [0]
        uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        row = wait_study(n.db, uid, "exported", export_state="done")
        text = scrape(port)
    assert value(text, f'dscint_instances_total{{calling_ae="{CALLER}",status="0x0000"}}') == 1
    assert value(text, "dscint_cstore_seconds_count") == 1
    assert 0 < value(text, "dscint_cstore_seconds_sum") < 30
    assert value(text, f'dscint_studies_total{{outcome="classified",predicted_class='
                       f'"{row.predicted_class}"}}') == 1
    assert value(text, "dscint_classify_seconds_count") == 1
    assert value(text, 'dscint_objects_total{outcome="delivered"}') == 1
    assert value(text, "dscint_last_instance_to_ack_seconds_count") == 1
    # today's gauges keep their names
    assert "dscint_degraded 0\n" in text and "dscint_receiver_up 1\n" in text
    assert 'dscint_queue{kind="pending_exports"} 0' in text


def test_refusals_are_counted_by_status(tmp_path: Path, untrained_model: Path,
                                        pacs: PacsStandIn) -> None:
    port = free_port()
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port, health={"port": port},
                      admission={"max_study_instances": 1})
    paths = write_study(generate_study("normal", seed=12), tmp_path / "out",
                        DicomLayout.PER_VIEW)
    with Node(cfg) as n:
        statuses = send_paths(paths, dest(n), CALLER)
        assert statuses[0] == 0 and statuses[1] != 0
        text = scrape(port)
    assert value(text, f'dscint_instances_total{{calling_ae="{CALLER}",status="0x0000"}}') == 1
    assert value(text, f'dscint_instances_total{{calling_ae="{CALLER}",'
                       f'status="0x{statuses[1]:04X}"}}') == 1
    assert value(text, "dscint_cstore_seconds_count") == 2


def test_calling_ae_labels_are_bounded() -> None:
    m = Metrics(max_callers=2)
    for ae in ("CAM1", "CAM2", "CAM3", "CAM4", "CAM1"):
        m.observe_store(0, ae, 0.01)
    text = m.text()
    assert value(text, 'dscint_instances_total{calling_ae="CAM1",status="0x0000"}') == 2
    assert value(text, 'dscint_instances_total{calling_ae="other",status="0x0000"}') == 2
    assert "CAM3" not in text


def test_stored_lines_are_parsed_and_bad_ones_ignored() -> None:
    seen: list[tuple[int, str, float]] = []
    rp = ReceiverProcess(node_config(Path("/nonexistent"), Path("m.pt"), 1), lambda: None,
                         on_stored=lambda s, ae, t: seen.append((s, ae, t)))
    line = stored_line(0xC017, "EVIL\ncomplete 1.2", 0.5)
    assert line.count("\n") == 1  # a newline in an AE title cannot forge a message
    rp._on_line(line.split())
    rp._on_line(["stored", "x", "0.1", "CAM"])  # malformed: ignored, logged
    assert seen == [(0xC017, "EVIL?complete 1.2", 0.5)]


def test_grafana_dashboard_uses_only_metrics_the_node_exports(tmp_path: Path) -> None:
    """Every dscint_* name in deploy/grafana-dashboard.json is one /metrics serves."""
    doc = json.loads((Path(__file__).resolve().parent.parent / "deploy" /
                      "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|count|sum)$", "", n)
            for e in exprs for n in re.findall(r"dscint_\w+", e)}
    report = {"status": "ok", "queue": {"dead_exports": 0}, "work": {},
              "receiver": {"alive": True, "restarts": 0}, "disk": {}}
    served = metrics_text(report) + Metrics().text()
    missing = {n for n in used if not re.search(rf"^(# TYPE )?{n}\b", served, re.MULTILINE)}
    assert len(used) >= 10 and not missing, missing


def test_acknowledgement_latency_is_observed_once_per_study() -> None:
    m = Metrics()
    m.observe_export("delivered", "1.2.3", 4.0)  # the SR
    m.observe_export("delivered", "1.2.3", 5.0)  # its result image: same study
    m.observe_export("retry", "1.2.4")
    text = m.text()
    assert value(text, "dscint_last_instance_to_ack_seconds_count") == 1
    assert value(text, 'dscint_objects_total{outcome="delivered"}') == 2
    assert value(text, 'dscint_objects_total{outcome="failed"}') == 1
    assert value(text, 'dscint_retries_total{stage="export"}') == 1
