"""Physician feedback: recorded by `feedback --study/--label` and `--csv` (bad rows refused
by line number, nothing about the patient in logs or messages, a later label replaces the
earlier), scored against the served and shadow models' findings, and used by
`retrain --from-db` as labels."""

from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom import dcmread

from model.calibration import INDETERMINATE
from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.__main__ import main
from node.ops.feedback import FeedbackError, read_csv
from storage.db import Database, ShadowResult
from storage.feedback import agreement, feedback_labels, record_feedback
from storage.intake import InstanceRecord, record_instance
from storage.jobs import NewResult, store_result
from storage.registry import NewModel, register_model

PATIENT = "Doe^Jane"  # in an extra CSV column: must never reach a log or a message


def _config(tmp_path: Path, database_url: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\nroot = "{tmp_path / "node"}"\ndatabase = "{database_url}"\n')
    return path


def _study(db: Database, uid: str, path: str = "/nowhere/x.dcm",
           views: tuple[str, ...] = ("anterior", "posterior"), patient: str | None = None,
           sop: str | None = None) -> None:
    record_instance(db, InstanceRecord(
        sop_uid=sop or f"{uid}.1", study_uid=uid, series_uid=sop or f"{uid}.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.20", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=path, views=views, n_frames=len(views), size_bytes=1000, calling_ae="CAMERA",
        patient_key=patient))


def test_study_and_label_then_replaced(db: Database, database_url: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, database_url)
    _study(db, "1.2.3")
    assert main(["feedback", "--config", str(cfg), "--study", "1.2.3", "--label",
                 "normal"]) == 0
    assert "1 new, 0 replacing" in capsys.readouterr().out
    assert main(["feedback", "--config", str(cfg), "--study", "1.2.3", "--label",
                 "arthritis"]) == 0
    out = capsys.readouterr().out
    assert "0 new, 1 replacing" in out and "0 for studies not received" in out
    assert feedback_labels(db) == {"1.2.3": "arthritis"}
    # a study the node has not received (yet) is kept, and counted apart
    assert main(["feedback", "--config", str(cfg), "--study", "1.2.4", "--label",
                 "thyroid_carcinoma"]) == 0
    assert "1 for studies not received (yet)" in capsys.readouterr().out
    assert feedback_labels(db) == {"1.2.3": "arthritis", "1.2.4": "thyroid_carcinoma"}


def test_bad_arguments_record_nothing(db: Database, database_url: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, database_url)
    with pytest.raises(SystemExit) as exc:  # argparse: --label is one of the classes
        main(["feedback", "--config", str(cfg), "--study", "1.2.3", "--label", "gout"])
    assert exc.value.code == 2
    assert main(["feedback", "--config", str(cfg), "--study", "../etc", "--label",
                 "normal"]) == 2
    assert "--study: study_uid is not a DICOM UID" in capsys.readouterr().err
    assert main(["feedback", "--config", str(cfg), "--study", "1.2.3"]) == 2
    assert "--study needs --label" in capsys.readouterr().err
    csv_file = tmp_path / "f.csv"
    csv_file.write_text("study_uid,label\n1.2.3,normal\n")
    assert main(["feedback", "--config", str(cfg), "--csv", str(csv_file), "--label",
                 "normal"]) == 2
    assert feedback_labels(db) == {}


def test_csv_import_and_bad_rows_by_line(db: Database, database_url: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str],
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = _config(tmp_path, database_url)
    _study(db, "1.2.10")
    good = tmp_path / "good.csv"
    good.write_text("\ufeffStudy_UID,label,patient_name\n1.2.10,normal," + PATIENT +
                    "\n\n1.2.11,bone_metastasis," + PATIENT + "\n1.2.10,arthritis,x\n",
                    encoding="utf-8")
    assert main(["feedback", "--config", str(cfg), "--csv", str(good)]) == 0
    out = capsys.readouterr().out
    assert "2 label(s) recorded (2 new" in out and "1 for studies not received" in out
    # a later row for the same study wins, as a later command would
    assert feedback_labels(db) == {"1.2.10": "arthritis", "1.2.11": "bone_metastasis"}
    bad = tmp_path / "bad.csv"
    bad.write_text(f"study_uid,label,name\n1.2.12,normal,{PATIENT}\n{PATIENT},normal,a\n"
                   f"1.2.13,{PATIENT},b\n1.2.14\n1.2.15,thyroid_carcinoma,c\n")
    assert main(["feedback", "--config", str(cfg), "--csv", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "nothing recorded" in err
    assert "bad.csv: line 3: study_uid is not a DICOM UID" in err
    assert "bad.csv: line 4: label is not one of normal, bone_metastasis" in err
    assert "bad.csv: line 5: 1 column(s), 3 expected" in err
    assert "line 2" not in err and "line 6" not in err
    assert feedback_labels(db) == {"1.2.10": "arthritis", "1.2.11": "bone_metastasis"}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "feedback recorded: 2 new, 0 replaced, 1 for studies not received (yet): " \
           "1.2.10, 1.2.11" in logged
    for text in (logged, out, err):
        assert "Doe" not in text and "Jane" not in text


def test_csv_bounds_and_shape(tmp_path: Path) -> None:
    f = tmp_path / "f.csv"
    f.write_text("study_uid,label\n" + "1.2.3,normal\n" * 100)
    with pytest.raises(FeedbackError, match="larger than 0 MiB"):
        read_csv(f, max_bytes=1000)
    assert len(read_csv(f)) == 100
    f.write_bytes(b"study_uid,label\n1.2.3,\xff\xfe\n")
    with pytest.raises(FeedbackError, match="not UTF-8"):
        read_csv(f)
    f.write_text("uid,class\n1.2.3,normal\n")
    with pytest.raises(FeedbackError, match="line 1: header lacks study_uid, label"):
        read_csv(f)
    f.write_text("study_uid,label\n\n")
    with pytest.raises(FeedbackError, match="no labelled rows"):
        read_csv(f)
    with pytest.raises(FeedbackError, match="cannot read"):
        read_csv(tmp_path / "absent.csv")
    f.write_text("study_uid,label\n" + "x,normal\n" * 30)
    with pytest.raises(FeedbackError) as exc:
        read_csv(f)
    assert len(exc.value.errors) == 30 and "... and 10 more" in str(exc.value)


def _result(db: Database, uid: str, version: str, predicted: str) -> None:
    store_result(db, NewResult(
        study_uid=uid, job_id=None, model_version=version, model_sha256="ab" * 32,
        predicted_class=predicted, probabilities={}, per_view={}, sr_sop_uid=f"{uid}.{version}",
        sr_series_uid=f"{uid}.8", sr_path="/nowhere"), "PACS@127.0.0.1:104")


def test_agreement_of_served_and_shadow_models(db: Database, database_url: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    truth = {"1.3.1": "normal", "1.3.2": "arthritis", "1.3.3": "bone_metastasis",
             "1.3.4": "normal"}
    served = {"1.3.1": "normal", "1.3.2": "normal", "1.3.3": "indeterminate",
              "1.3.4": "normal"}
    shadow = {"1.3.1": "normal", "1.3.2": "arthritis", "1.3.3": "bone_metastasis",
              "1.3.4": None}  # the shadow run failed on 1.3.4
    for uid in truth:
        _study(db, uid)
        _result(db, uid, "v1", served[uid])
        with db.session() as s, s.begin():
            s.add(ShadowResult(study_uid=uid, version="v2", serving_version="v1",
                               serving_class=served[uid], predicted_class=shadow[uid],
                               created_at=datetime.now(UTC)))
    _study(db, "1.3.5")
    _result(db, "1.3.5", "v1", "arthritis")  # no feedback: not scored
    for uid, label in truth.items():
        record_feedback(db, uid, label)
    got = {(a.version, a.shadow): a for a in agreement(db, INDETERMINATE)}
    v1, v2 = got[("v1", False)], got[("v2", True)]
    assert (v1.compared, v1.agree, v1.undecided) == (3, 2, 1)
    assert (v2.compared, v2.agree, v2.undecided) == (3, 3, 0)
    assert v1.rate == pytest.approx(2 / 3) and v2.rate == 1.0
    # `models` shows the served version's agreement beside its other figures
    cfg = _config(tmp_path, database_url)
    src = tmp_path / "v1.pt"
    src.write_bytes(b"not loaded by the registry listing")
    register_model(db, tmp_path / "node", src, NewModel("v1", "ef" * 32, "phantoms", {}))
    monkeypatch.setenv("COLUMNS", "250")
    capsys.readouterr()
    assert main(["models", "--config", str(cfg)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "v1" in line)
    assert "2/3 (66.7%)" in row


def test_retrain_from_db_uses_feedback_labels(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Stored phantom studies, all generated as "normal", labelled by feedback with every
    class: the training data counts the feedback's classes, not the generator's."""
    url = f"sqlite:///{tmp_path / 'node' / 'dscint.db'}"
    cfg = _config(tmp_path, url)
    db = Database(url)
    db.create_all()
    labels = ["normal", "bone_metastasis", "arthritis", "thyroid_carcinoma"] * 2
    for i, label in enumerate(labels):
        paths = write_study(generate_study("normal", seed=100 + i), tmp_path / f"s{i}",
                            DicomLayout.MULTIFRAME)
        ds = dcmread(paths[0], stop_before_pixels=True)
        uid = str(ds.StudyInstanceUID)
        _study(db, uid, str(paths[0]), patient=f"pk-{i}", sop=str(ds.SOPInstanceUID))
        record_feedback(db, uid, label)
    record_feedback(db, "1.2.999", "normal")  # not received: skipped
    db.dispose()
    out = tmp_path / "report"
    rc = main(["retrain", "--config", str(cfg), "--from-db", "--epochs", "1", "--runs", "1",
               "--batch-size", "4", "--no-register", "--no-trivial-baseline", "--quiet",
               "--out", str(out), "--threads", "2"])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "data.json").read_text())
    assert data["description"] == "8 stored study(ies) labelled by physicians' feedback"
    assert data["images"] == 16 and data["patients"] == 8
    assert data["images_per_class"] == {c: 2 * n for c, n in Counter(labels).items()}


def test_retrain_from_db_without_feedback_says_so(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, f"sqlite:///{tmp_path / 'node' / 'dscint.db'}")
    assert main(["retrain", "--config", str(cfg), "--from-db", "--quiet"]) == 2
    assert "none is recorded: run `python -m node feedback` first" in capsys.readouterr().err
