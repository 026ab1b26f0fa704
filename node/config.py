"""Configuration: `config.toml` validated once at start-up into one typed, frozen object.

An unknown key or a value of the wrong type stops start-up with a message naming the key, so a
typo in a hospital's config never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.dicom.codes import ACCEPTED_SOP_CLASSES, SR_STORAGE_CLASSES, storage_class_uid

DEFAULT_DB_NAME = "dscint.db"


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key."""


@dataclass(frozen=True)
class CallerRule:
    """An allowed calling AE title, optionally pinned to one host/IP."""

    ae_title: str
    host: str | None = None

    @classmethod
    def parse(cls, text: str) -> CallerRule:
        """'MODALITY1' or 'MODALITY1@10.0.0.5'."""
        ae, _, host = text.partition("@")
        ae = ae.strip()
        if not ae or len(ae) > 16:
            raise ConfigError(f"[node].allowed_callers: invalid AE title in {text!r}")
        return cls(ae, host.strip() or None)

    def allows(self, ae_title: str, address: str) -> bool:
        """True when the calling AE (and host, if pinned) match."""
        return ae_title.strip() == self.ae_title and (self.host is None or self.host == address)


@dataclass(frozen=True)
class NodeSection:
    """[node]: how modalities reach us."""

    ae_title: str = "DSCINT"
    bind_address: str = "127.0.0.1"
    port: int = 11112
    allowed_callers: tuple[str, ...] = ()
    max_pdu: int = 1_048_576
    max_associations: int = 10
    # the listener's gate (node.receive.listener): what a connection may do before it negotiates
    first_pdu_timeout: float = 5.0  # s to send the A-ASSOCIATE-RQ (TLS handshake included)
    max_pending_connections: int = 256  # waiting for their first PDU; then the oldest goes
    max_connections_per_address: int = 10  # waiting or associated, from one IP address
    max_connection_rate_per_address: float = 200.0  # new connections a second; 0 = no limit
    log_lines_per_address: int = 5  # lines of each kind about one address per window
    log_window_seconds: float = 60.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    store_db_wait_seconds: float = 5.0  # a C-STORE waits this long for the DB lock, then 0xA700
    worker_threads: int = 1
    torch_threads: int = 2
    receiver_process: bool = True  # the SCP in a process of its own (see node.receive.process)
    classify_max_attempts: int = 5  # a study whose classification keeps failing: then failed
    classify_backoff_seconds: float = 30.0  # wait before retry n: this * 2**(n-1), capped
    classify_backoff_cap_seconds: float = 600.0
    claim_lease_seconds: float = 60.0  # a claim with no heartbeat this long goes back to the queue


@dataclass(frozen=True)
class PacsSection:
    """[pacs]: where SRs go."""

    ae_title: str = "PACS"
    host: str = "127.0.0.1"
    port: int = 104
    tls: bool = False  # DICOM over TLS to PACS; its certificate is verified
    tls_ca_file: str = ""  # CAs that sign PACS's certificate; empty = system CAs
    tls_cert_file: str = ""  # our client certificate, when PACS requires one
    tls_key_file: str = ""
    tls_server_name: str = ""  # name in PACS's certificate; empty = host
    # SR classes offered for the result, best first (UIDs or keywords); empty = all three
    sr_classes: tuple[str, ...] = ()

    @property
    def sr_class_uids(self) -> tuple[str, ...]:
        """The SR classes to propose, best first (validated to be SR_STORAGE_CLASSES)."""
        named = tuple(storage_class_uid(c) or c for c in self.sr_classes)
        return named or SR_STORAGE_CLASSES


@dataclass(frozen=True)
class ExportSection:
    """[export]: retry policy for SR delivery (dcm4chee-like: doubling, capped)."""

    max_attempts: int = 10
    backoff_base_seconds: float = 30.0
    backoff_cap_seconds: float = 600.0
    timeout_seconds: float = 30.0


@dataclass(frozen=True)
class StorageSection:
    """[storage]: file store root and the SQLAlchemy URL of the queue database."""

    root: str = "var/dscint"
    database: str = ""  # empty = sqlite file <root>/dscint.db
    min_free_mb: int = 512  # C-STORE answers 0xA700 below this much free disk
    retention_days: float = 0.0  # delivered studies' files purged after this; 0 = keep
    housekeeping_seconds: float = 3600.0
    quarantine_max_copy_kib: int = 64  # a larger refused instance keeps only this prefix
    quarantine_quota_mb: int = 1024  # quarantine/'s total; the oldest copies go first
    quarantine_days: float = 30.0  # quarantined copies older than this go; 0 = quota only


@dataclass(frozen=True)
class ModelSection:
    """[model]: the TorchScript file to serve."""

    path: str = "var/dscint/models/dscint.pt"
    indeterminate_below: float = 0.0  # 0 = the threshold stored in the model
    # promotion waits for a shadow trial (`models shadow VERSION`): 0 = no requirement
    promote_min_shadow_studies: int = 0
    promote_min_agreement: float = 0.0  # share of shadow studies agreeing with serving
    shadow_backlog: int = 16  # studies waiting for the shadow model; beyond: skipped, counted


@dataclass(frozen=True)
class CompletionSection:
    """[completion]: when a study counts as complete without both views."""

    quiet_seconds: float = 120.0
    sweep_seconds: float = 5.0
    # a new view after the result amends it (once quiet) within this many days of the
    # study's first result; later ones are kept and counted late only (0 = never amend)
    amend_window_days: float = 7.0


@dataclass(frozen=True)
class LoggingSection:
    """[logging]."""

    level: str = "INFO"


@dataclass(frozen=True)
class TlsSection:
    """[tls]: DICOM over TLS for incoming associations (off = plain TCP)."""

    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""  # CAs whose client certificates are accepted
    require_client_cert: bool = False


@dataclass(frozen=True)
class HealthSection:
    """[health]: the HTTP health endpoint (port 0 = off), local-only by default."""

    port: int = 0
    bind_address: str = "127.0.0.1"
    token: str = ""  # when set, the web page (GET /) needs ?token= or a Bearer header
    page_refresh_seconds: int = 10  # the web page reloads itself this often


ALERT_EVENTS = ("dead_letter", "failed_study", "degraded", "finding")


@dataclass(frozen=True)
class AlertsSection:
    """[alerts]: webhooks (JSON POST) on trouble; no URL = off."""

    urls: tuple[str, ...] = ()
    events: tuple[str, ...] = ("dead_letter", "failed_study", "degraded")
    findings: tuple[str, ...] = ()  # classes that raise a "finding" alert (needs the event)
    timeout_seconds: float = 5.0  # one POST
    max_attempts: int = 5  # POSTs per alert before it is given up (logged)
    backoff_seconds: float = 1.0  # first delay between attempts, doubled each time
    health_check_seconds: float = 30.0  # how often health is checked for "degraded"


@dataclass(frozen=True)
class ResultsSection:
    """[results]: the objects sent to PACS beside the SR (for people: every viewer shows an
    image, a RIS or document viewer shows a PDF)."""

    image: bool = True  # the result image, a colour Secondary Capture the SR references
    pdf: bool = True  # a one-page PDF report (Encapsulated PDF Storage)


@dataclass(frozen=True)
class DriftSection:
    """[drift]: per-window comparison of predicted classes and input characteristics
    (node.service.drift); past the threshold /health is degraded with the reason."""

    window_days: float = 7.0  # one window; the current one ends now
    baseline_windows: int = 4  # previous windows pooled as the baseline
    threshold: float = 0.25  # total variation distance (0-1) that raises the alarm (when also
    # past the characteristic's usual variation between the previous windows)
    min_studies: int = 30  # fewer studies in the current window or the baseline: no verdict
    check_seconds: float = 900.0  # how often a running node recomputes it (0 = never)


NOT_APPLICABLE_POLICIES = ("store", "refuse")


@dataclass(frozen=True)
class AdmissionSection:
    """[admission]: size caps, and what happens to an instance that is not a whole-body
    planar view."""

    not_applicable: str = "store"  # "store": kept, Success, never classified; "refuse": 0xC016
    max_instance_mb: int = 64  # one C-STORE's encoded size (deflated: inflated), else 0xC015
    max_study_instances: int = 100  # instances per study, else 0xC017 (0 = no cap)
    max_study_decoded_mb: int = 1024  # rows x columns x frames x 4 summed per study, else 0xC017
    # storage SOP classes answered 0x0122 instead of Success-and-ignored (UIDs or keywords)
    refuse_sop_classes: tuple[str, ...] = ()

    @property
    def refused_sop_class_uids(self) -> frozenset[str]:
        """The refuse list as UIDs (validated: standard storage classes, never an input)."""
        return frozenset(storage_class_uid(c) or c for c in self.refuse_sop_classes)

    @property
    def refuses_not_applicable(self) -> bool:
        """C-STORE of a non-whole-body instance answered 0xC016 and quarantined."""
        return self.not_applicable == "refuse"


@dataclass(frozen=True)
class Config:
    """Everything the node needs, validated."""

    node: NodeSection = field(default_factory=NodeSection)
    pacs: PacsSection = field(default_factory=PacsSection)
    export: ExportSection = field(default_factory=ExportSection)
    storage: StorageSection = field(default_factory=StorageSection)
    model: ModelSection = field(default_factory=ModelSection)
    completion: CompletionSection = field(default_factory=CompletionSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    tls: TlsSection = field(default_factory=TlsSection)
    health: HealthSection = field(default_factory=HealthSection)
    admission: AdmissionSection = field(default_factory=AdmissionSection)
    alerts: AlertsSection = field(default_factory=AlertsSection)
    drift: DriftSection = field(default_factory=DriftSection)
    results: ResultsSection = field(default_factory=ResultsSection)
    base_dir: Path = Path(".")

    @property
    def storage_root(self) -> Path:
        """Absolute storage root (relative paths are relative to the config file)."""
        return _resolve(self.base_dir, self.storage.root)

    @property
    def database_url(self) -> str:
        """SQLAlchemy URL; defaults to an SQLite file under the storage root."""
        return self.storage.database or f"sqlite:///{self.storage_root / DEFAULT_DB_NAME}"

    @property
    def model_path(self) -> Path:
        """Absolute path of the served model."""
        return _resolve(self.base_dir, self.model.path)

    @property
    def caller_rules(self) -> tuple[CallerRule, ...]:
        """Parsed allowlist; empty means any caller is accepted."""
        return tuple(CallerRule.parse(c) for c in self.node.allowed_callers)

    def file_path(self, p: str) -> Path | None:
        """A configured file (TLS keys, CAs) resolved like the others; None when unset."""
        return _resolve(self.base_dir, p) if p else None

    @property
    def min_free_bytes(self) -> int:
        """The free-disk watermark in bytes."""
        return self.storage.min_free_mb * 1024 * 1024

    @property
    def quarantine_max_copy_bytes(self) -> int:
        """Largest quarantined copy in bytes (storage.filestore.QuarantineLimits)."""
        return self.storage.quarantine_max_copy_kib * 1024

    @property
    def quarantine_quota_bytes(self) -> int:
        """The quarantine folder's quota in bytes (storage.filestore.QuarantineLimits)."""
        return self.storage.quarantine_quota_mb * 1024 * 1024

    @property
    def pacs_destination(self) -> str:
        """'AE@host:port', the key exports are recorded under."""
        return f"{self.pacs.ae_title}@{self.pacs.host}:{self.pacs.port}"


def _resolve(base: Path, p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config) if f.name != "base_dir"
}


def _coerce(section: str, key: str, expected: Any, value: Any) -> Any:
    """Check one value against its annotated type; ints are accepted where floats are."""
    name = f"[{section}].{key}"
    origin = typing.get_origin(expected)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings, got {value!r}")
        return tuple(value)
    if origin in (types.UnionType, typing.Union):
        raise ConfigError(f"{name}: unsupported type")  # pragma: no cover - no such fields
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"{name} must be {expected.__name__}, got {type(value).__name__} "
                          f"{value!r}")
    return value


def _build_section(name: str, cls: type, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(table) - set(hints))
    if unknown:
        raise ConfigError(f"unknown key [{name}].{unknown[0]} (known: {', '.join(sorted(hints))})")
    values = {k: _coerce(name, k, hints[k], v) for k, v in table.items()}
    return cls(**values)


def _validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    checks = [
        (1 <= len(cfg.node.ae_title.strip()) <= 16, "[node].ae_title must be 1-16 characters"),
        (0 <= cfg.node.port <= 65535, "[node].port must be 0-65535"),
        (1 <= cfg.pacs.port <= 65535, "[pacs].port must be 1-65535"),
        (1 <= len(cfg.pacs.ae_title.strip()) <= 16, "[pacs].ae_title must be 1-16 characters"),
        (cfg.node.max_pdu == 0 or cfg.node.max_pdu >= 4096, "[node].max_pdu must be 0 or >= 4096"),
        (cfg.node.worker_threads >= 1, "[node].worker_threads must be >= 1"),
        (cfg.node.classify_max_attempts >= 1, "[node].classify_max_attempts must be >= 1"),
        (cfg.node.classify_backoff_seconds >= 0 and cfg.node.classify_backoff_cap_seconds >= 0,
         "[node].classify_backoff_seconds and classify_backoff_cap_seconds must be >= 0"),
        (cfg.export.max_attempts >= 1, "[export].max_attempts must be >= 1"),
        (cfg.completion.quiet_seconds > 0, "[completion].quiet_seconds must be > 0"),
        (cfg.completion.amend_window_days >= 0,
         "[completion].amend_window_days must be >= 0 (0 = never amend)"),
        (cfg.logging.level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
         "[logging].level must be DEBUG, INFO, WARNING or ERROR"),
        *_safety_checks(cfg),
        *_drift_checks(cfg),
        *_listener_checks(cfg),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    cfg.caller_rules  # noqa: B018 - parses, raising ConfigError on a bad entry


def _drift_checks(cfg: Config) -> list[tuple[bool, str]]:
    """Checks of the [drift] keys."""
    d = cfg.drift
    return [
        (d.window_days > 0, "[drift].window_days must be > 0"),
        (1 <= d.baseline_windows <= 52, "[drift].baseline_windows must be 1-52"),
        (0 < d.threshold <= 1, "[drift].threshold must be a distance in (0, 1]"),
        (d.min_studies >= 1, "[drift].min_studies must be >= 1"),
        (d.check_seconds >= 0, "[drift].check_seconds must be >= 0"),
    ]


def _listener_checks(cfg: Config) -> list[tuple[bool, str]]:
    """Checks of the listener's [node] keys."""
    n = cfg.node
    return [
        (n.max_associations >= 1, "[node].max_associations must be >= 1"),
        (n.first_pdu_timeout > 0, "[node].first_pdu_timeout must be > 0"),
        (n.max_pending_connections >= 1, "[node].max_pending_connections must be >= 1"),
        (n.max_connections_per_address >= 1, "[node].max_connections_per_address must be >= 1"),
        (n.max_connection_rate_per_address >= 0,
         "[node].max_connection_rate_per_address must be >= 0"),
        (n.log_lines_per_address >= 1, "[node].log_lines_per_address must be >= 1"),
        (n.log_window_seconds > 0, "[node].log_window_seconds must be > 0"),
        (n.claim_lease_seconds > 0, "[node].claim_lease_seconds must be > 0"),
    ]


def _safety_checks(cfg: Config) -> list[tuple[bool, str]]:
    """Checks of the [tls], [health], [admission] and resource keys."""
    t, p, s = cfg.tls, cfg.pacs, cfg.storage
    return [
        (not t.enabled or bool(t.cert_file and t.key_file),
         "[tls].cert_file and key_file are required when [tls].enabled"),
        (not t.require_client_cert or (t.enabled and bool(t.ca_file)),
         "[tls].require_client_cert needs [tls].enabled and [tls].ca_file"),
        (bool(p.tls_cert_file) == bool(p.tls_key_file),
         "[pacs].tls_cert_file and tls_key_file go together"),
        (s.min_free_mb >= 0, "[storage].min_free_mb must be >= 0"),
        (s.retention_days >= 0, "[storage].retention_days must be >= 0"),
        (s.quarantine_max_copy_kib >= 1, "[storage].quarantine_max_copy_kib must be >= 1"),
        (s.quarantine_quota_mb * 1024 >= s.quarantine_max_copy_kib,
         "[storage].quarantine_quota_mb must hold at least one quarantine_max_copy_kib copy"),
        (s.quarantine_days >= 0, "[storage].quarantine_days must be >= 0"),
        (s.housekeeping_seconds > 0, "[storage].housekeeping_seconds must be > 0"),
        (0 <= cfg.health.port <= 65535, "[health].port must be 0-65535"),
        (0 <= cfg.model.indeterminate_below <= 1,
         "[model].indeterminate_below must be 0 (the model's own) or a probability up to 1"),
        (cfg.model.promote_min_shadow_studies >= 0,
         "[model].promote_min_shadow_studies must be >= 0"),
        (0 <= cfg.model.promote_min_agreement <= 1,
         "[model].promote_min_agreement must be a share from 0 to 1"),
        (cfg.model.shadow_backlog >= 1, "[model].shadow_backlog must be >= 1"),
        (cfg.health.page_refresh_seconds >= 1, "[health].page_refresh_seconds must be >= 1"),
        (all(e in ALERT_EVENTS for e in cfg.alerts.events),
         f"[alerts].events must be among {', '.join(ALERT_EVENTS)}"),
        (all(u.startswith(("http://", "https://")) for u in cfg.alerts.urls),
         "[alerts].urls must be http:// or https:// URLs"),
        (cfg.alerts.timeout_seconds > 0 and cfg.alerts.backoff_seconds >= 0
         and cfg.alerts.health_check_seconds > 0,
         "[alerts].timeout_seconds and health_check_seconds must be > 0, backoff_seconds >= 0"),
        (cfg.alerts.max_attempts >= 1, "[alerts].max_attempts must be >= 1"),
        (cfg.admission.not_applicable in NOT_APPLICABLE_POLICIES,
         '[admission].not_applicable must be "store" or "refuse"'),
        (cfg.admission.max_instance_mb >= 1, "[admission].max_instance_mb must be >= 1"),
        (cfg.admission.max_study_instances >= 0 and cfg.admission.max_study_decoded_mb >= 0,
         "[admission].max_study_instances and max_study_decoded_mb must be >= 0"),
        (0 < cfg.node.store_db_wait_seconds < cfg.node.dimse_timeout,
         "[node].store_db_wait_seconds must be > 0 and below [node].dimse_timeout"),
        (all(storage_class_uid(c) not in (None, *ACCEPTED_SOP_CLASSES)
             for c in cfg.admission.refuse_sop_classes),
         "[admission].refuse_sop_classes must name standard storage SOP classes (UID or "
         "keyword), not NM Image Storage or Secondary Capture"),
        (all(storage_class_uid(c) in SR_STORAGE_CLASSES for c in p.sr_classes)
         and len(set(p.sr_class_uids)) == len(p.sr_class_uids),
         "[pacs].sr_classes must list, once each, Comprehensive3DSRStorage, "
         "ComprehensiveSRStorage or EnhancedSRStorage (keyword or UID)"),
    ]


def config_from_dict(doc: dict[str, Any], base_dir: Path = Path(".")) -> Config:
    """Build and validate a Config from a parsed TOML document."""
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}] (known: {', '.join(SECTIONS)})")
    sections = {name: _build_section(name, cls, doc.get(name, {}))
                for name, cls in SECTIONS.items()}
    cfg = Config(**sections, base_dir=base_dir)
    _validate(cfg)
    return cfg


def load_config(path: Path | None) -> Config:
    """Read a TOML file (or embedded defaults when None) into a validated Config."""
    if path is None:
        return config_from_dict({})
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return config_from_dict(doc, base_dir=path.resolve().parent)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The sections as plain data (JSON-able); `config_from_dict` reads it back."""
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


def with_overrides(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy with some section fields replaced (used by the demo and tests), re-validated."""
    replaced = {name: dataclasses.replace(getattr(cfg, name), **values)
                for name, values in sections.items()}
    out = dataclasses.replace(cfg, **replaced)
    _validate(out)
    return out
