"""TorchScript export -> load -> same outputs as eager; metadata checks; classifier behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from torch import Tensor, nn

from model.classes import CLASS_NAMES
from model.classifier import (
    OPTIMIZED,
    SERVING_BATCH,
    SERVING_TOLERANCE,
    TORCHSCRIPT,
    Classifier,
    check_batch,
    plan_views,
)
from model.dscint import Dscint, DscintProbabilities
from model.export import (
    METADATA_FILE,
    ModelFileError,
    ModelMetadata,
    export_torchscript,
    load_torchscript,
    weights_sha256,
)
from model.phantoms import generate_study
from model.preprocess import preprocess_batch
from node.runtime import release_library_pages

REPO = Path(__file__).resolve().parents[1]


def test_export_load_gives_same_outputs_as_eager(tmp_path: Path) -> None:
    torch.manual_seed(7)
    eager = DscintProbabilities(Dscint()).eval()
    meta = ModelMetadata(version="v-test", weights_sha256="", training_data="unit test",
                         trained_on_phantoms=True, metrics={"study_accuracy": 0.5})
    path = export_torchscript(eager, tmp_path / "m.pt", meta)
    scripted, loaded = load_torchscript(path)
    x = torch.rand(3, 1, 1024, 256)
    with torch.inference_mode():
        assert torch.allclose(scripted(x), eager(x), atol=1e-6)
    assert loaded.version == "v-test"
    assert loaded.weights_sha256 == weights_sha256(eager)
    assert loaded.class_names == CLASS_NAMES
    assert loaded.input_shape == (1, 1024, 256)
    assert loaded.metrics == {"study_accuracy": 0.5}
    assert loaded.trained_on_phantoms


def _rewrite_metadata(src: Path, dst: Path, edit: dict[str, object]) -> None:
    """Copy a model zip with its metadata JSON changed (how a tampered file looks)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith(f"extra/{METADATA_FILE}"):
                doc = json.loads(data)
                doc.update(edit)
                data = json.dumps(doc).encode()
            zout.writestr(item, data)


@pytest.mark.parametrize("edit, message", [
    ({"weights_sha256": "0" * 64}, "sha256"),
    ({"format": "something-else"}, "format"),
    ({"preprocessing": {"version": 99, "rows": 1024, "cols": 256, "norm_percentile": 99.5,
                        "clip_max": 4.0}}, "preprocessing"),
    ({"classes": [{"index": 0, "name": "normal", "code_value": "1", "code_meaning": "x",
                   "scheme": "SCT"}]}, "classes"),
])
def test_load_refuses_inconsistent_metadata(untrained_model: Path, tmp_path: Path,
                                            edit: dict[str, object], message: str) -> None:
    bad = tmp_path / "bad.pt"
    _rewrite_metadata(untrained_model, bad, edit)
    with pytest.raises(ModelFileError, match=message):
        load_torchscript(bad)


def test_load_refuses_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        Classifier(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="cannot load"):
        Classifier(junk)


def test_plan_views_mirrors_a_missing_view() -> None:
    img = np.arange(12, dtype=np.float32).reshape(4, 3)
    planned = plan_views([("anterior", img)])
    assert [(v, src) for v, src, _ in planned] == [("anterior", None), ("posterior", "anterior")]
    assert np.array_equal(planned[1][2], img[:, ::-1])
    both = plan_views([("anterior", img), ("posterior", img)])
    assert [src for _, src, _ in both] == [None, None]
    unknown = plan_views([("unknown", img)])
    assert [(v, src) for v, src, _ in unknown] == [("unknown", None), ("unknown", "unknown")]
    with pytest.raises(ValueError):
        plan_views([])


def test_classifier_combines_views_by_mean(untrained_model: Path) -> None:
    clf = Classifier(untrained_model)
    rng = np.random.default_rng(0)
    ant = rng.poisson(5, (1024, 256)).astype(np.uint16)
    post = rng.poisson(5, (1024, 256)).astype(np.uint16)
    pred = clf.classify_study([("anterior", ant), ("posterior", post)])
    assert [v.view for v in pred.views] == ["anterior", "posterior"]
    per_view = clf.predict_images([ant, post])
    expected = per_view.mean(axis=0)
    assert [pred.probabilities[n] for n in CLASS_NAMES] == pytest.approx(list(expected))
    assert sum(pred.probabilities.values()) == pytest.approx(1.0)
    assert pred.predicted_class == CLASS_NAMES[int(np.argmax(expected))]


def test_many_views_are_classified_in_bounded_batches(untrained_model: Path) -> None:
    """A study of many instances goes through in batches of SERVING_BATCH (bounded memory):
    every image gets the probabilities it gets alone, in order, none lost at a boundary."""
    clf = Classifier(untrained_model)
    rng = np.random.default_rng(1)
    images = [rng.poisson(3 + i, (1024, 256)).astype(np.uint16)
              for i in range(2 * SERVING_BATCH + 1)]
    together = clf.predict_images(images)
    alone = np.concatenate([clf.predict_images([img]) for img in images])
    assert together.shape == (len(images), len(CLASS_NAMES))
    assert np.abs(together - alone).max() < 1e-5
    assert clf.predict_images([]).shape == (0, len(CLASS_NAMES))


def test_classifier_on_real_ge_scan(untrained_model: Path, realdata: Path) -> None:
    ds = pydicom.dcmread(realdata / "NM1_UNC.dcm")
    clf = Classifier(untrained_model)
    pred = clf.classify_study([("unknown", ds.pixel_array)])
    assert len(pred.views) == 2 and pred.views[1].mirrored_from == "unknown"
    assert set(pred.probabilities) == set(CLASS_NAMES)
    assert sum(pred.probabilities.values()) == pytest.approx(1.0)
    batch = preprocess_batch([ds.pixel_array])
    assert batch.shape == (1, 1, 1024, 256) and float(batch.min()) >= 0.0


# weights_sha256 of _OddTensors as computed by the first released version (a `.tobytes()` copy
# per tensor): model files already in registries must keep verifying.
ODD_TENSORS_SHA256 = "e13f94d7a4d186fea9ef09a3bab93e7ceec20f70b10d4cc5999eeaf50d58738f"


class _OddTensors(nn.Module):
    """Every kind of tensor a state dict may hold: bf16, bool, 0-d, empty, channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter((torch.arange(15.0).reshape(3, 5) / 7).bfloat16())
        self.register_buffer("flags", torch.tensor([True, False, True]))
        self.register_buffer("count", torch.tensor(7))
        self.register_buffer("empty", torch.zeros(0, 4))
        self.register_buffer("nhwc", (torch.arange(120.0).reshape(2, 3, 4, 5) / 11).to(
            memory_format=torch.channels_last))


def test_weights_sha256_is_unchanged_and_copies_nothing(untrained_model: Path) -> None:
    """Model files already in registries must still verify, and hashing the 78 MB FC1 must not
    allocate a 78 MB bytes copy (it put the node over its memory budget at load)."""
    module, meta = load_torchscript(untrained_model)
    odd = _OddTensors()
    assert weights_sha256(odd) == ODD_TENSORS_SHA256
    tracemalloc.start()
    try:
        digest = weights_sha256(module)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest == meta.weights_sha256
    assert peak < 1 << 20, f"hashing allocated {peak / 2**20:.1f} MiB"


@pytest.fixture(scope="module")
def bn_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Dscint whose BatchNorms are far from identity, so folding them into the convolutions
    changes the arithmetic and the comparison below means something."""
    torch.manual_seed(3)
    net = Dscint()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.2, 3.0)
            m.weight.data.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.3, 0.3)
    meta = ModelMetadata(version="bn-1", weights_sha256="", training_data="unit test",
                         trained_on_phantoms=True)
    return export_torchscript(DscintProbabilities(net), tmp_path_factory.mktemp("bn") / "m.pt",
                              meta)


def test_classifier_serves_an_optimised_module_with_the_same_answers(bn_model: Path) -> None:
    fast = Classifier(bn_model)
    plain = Classifier(bn_model, optimize=False)
    assert (fast.serving, plain.serving) == (OPTIMIZED, TORCHSCRIPT)
    assert 0.0 <= fast.check_diff <= SERVING_TOLERANCE
    assert fast.module is not plain.module
    assert list(fast.module.parameters()) == []  # frozen: weights are graph constants
    kinds = {n.kind() for n in fast.module.graph.nodes()}
    assert "aten::batch_norm" not in kinds  # folded into the convolutions
    study = generate_study("bone_metastasis", seed=5)
    views = [study.anterior, study.posterior, study.anterior[:, ::-1]]
    for n in (1, 2, 3):
        got, want = fast.predict_images(views[:n]), plain.predict_images(views[:n])
        assert got.shape == (n, len(CLASS_NAMES))
        np.testing.assert_allclose(got, want, rtol=0, atol=SERVING_TOLERANCE)
    assert fast.classify_study([("anterior", study.anterior)]).predicted_class == \
        plain.classify_study([("anterior", study.anterior)]).predicted_class


def _constant_bytes(module: torch.jit.ScriptModule) -> int:
    """Bytes of the dense tensors a frozen module holds as graph constants (each storage once)."""
    seen: dict[int, int] = {}
    for node in module.graph.nodes():
        if node.kind() == "prim::Constant" and node.output().type().kind() == "TensorType":
            t = node.t("value")
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_served_module_holds_the_weights_once(untrained_model: Path) -> None:
    """torch.jit.optimize_for_inference keeps FC1 twice (its transposed copy plus the original,
    left as a dead constant): 78 MB more. The served module must not."""
    verified, _ = load_torchscript(untrained_model)
    weights = sum(t.numel() * t.element_size() for t in verified.state_dict().values())
    served = Classifier(untrained_model)
    assert served.serving == OPTIMIZED
    assert 0.9 * weights < _constant_bytes(served.module) <= 1.01 * weights


class _Drifting(nn.Module):
    """Answers change with every call: no load-time check can vouch for an optimised copy."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, len(CLASS_NAMES))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return torch.softmax(self.head(x.mean(dim=(1, 2, 3))[:, None]) * self.calls, dim=1)


def test_classifier_serves_the_verified_module_when_the_check_fails(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    meta = ModelMetadata(version="drift-1", weights_sha256="", training_data="unit test",
                         trained_on_phantoms=True)
    path = export_torchscript(_Drifting(), tmp_path / "drift.pt", meta)
    with caplog.at_level("WARNING", logger="model.classifier"):
        clf = Classifier(path)
    assert clf.serving == TORCHSCRIPT
    assert clf.check_diff > SERVING_TOLERANCE
    assert "serving the verified TorchScript module unoptimised" in caplog.text
    verified, _ = load_torchscript(path)
    assert clf.module.code == verified.code  # the loaded module itself, not a frozen copy
    probs = clf.predict_images([np.ones((1024, 256), np.uint16)])
    assert probs.shape == (1, len(CLASS_NAMES)) and abs(probs.sum() - 1.0) < 1e-6


def test_check_batch_is_deterministic_and_in_range(untrained_model: Path) -> None:
    _, meta = load_torchscript(untrained_model)
    x = check_batch(meta)
    assert x.shape == (2, *meta.input_shape)
    assert torch.equal(x, check_batch(meta))
    assert float(x.min()) >= 0.0 and float(x.max()) <= meta.preprocessing.clip_max
    assert float(x[0].std()) > 0.5 and float(x[1].std()) > 0.5  # neither view is flat


_LOAD_PEAK = """
import sys, threading
from pathlib import Path
import numpy, torch
def mib(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
peak, done = [0.0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], mib("RssAnon"))
        done.wait(0.001)
before = mib("RssAnon")
sampler = threading.Thread(target=sample)
sampler.start()
from model.classifier import Classifier
torch.set_num_threads(2)
Classifier(Path(sys.argv[1]))
done.set()
sampler.join()
print(max(peak[0], mib("RssAnon")) - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_loading_peaks_at_the_weights_plus_a_little(untrained_model: Path) -> None:
    """In a fresh process, the anonymous memory (heap, tensors) the load adds above `import
    torch`, sampled every millisecond: the weights plus a little, not a second copy of every
    tensor (a bytes copy while hashing once cost that). Anonymous memory, not VmHWM: how many
    pages of libtorch a process maps resident depends on the page cache's history (a freshly
    installed venv maps ~25 MiB more), not on the code under test."""
    weights_mib = untrained_model.stat().st_size / 2**20
    out = subprocess.run([sys.executable, "-c", _LOAD_PEAK, str(untrained_model)], cwd=REPO,
                         capture_output=True, text=True, check=True)
    peak_above_import = float(out.stdout.strip().splitlines()[-1])
    assert peak_above_import < weights_mib + 60, f"load peaked {peak_above_import:.0f} MiB"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator controls")
def test_glibc_allocator_controls_take_effect() -> None:
    """The node caps malloc arenas and trims after each study; on glibc both must really run
    (a False here means the node silently keeps its larger footprint). A fresh process, so
    this test's own allocator stays untouched."""
    code = ("from node.runtime import trim_memory, tune_malloc\n"
            "print(tune_malloc(), trim_memory(collect=False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-1000:]
    assert out.stdout.split() == ["True", "True"]


_PAGEOUT = """
import mmap, sys
from pathlib import Path
import torch
def mib(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
lib = Path(sys.argv[1])  # a read-only mapping only this process has, named like a library
lib.write_bytes(bytes(range(256)) * (96 * 4096))
with lib.open("rb") as fh:
    mapped = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
    touched = sum(mapped[i] for i in range(0, len(mapped), 4096))  # every page resident
    x = torch.arange(12.0).reshape(3, 4)
    before = mib("RssFile")
    from node.runtime import release_library_pages
    advised = release_library_pages()
    after = mib("RssFile")
    print(advised, before, after, float((x @ x.T).sum()), touched)
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_start_up_library_pages_are_released_and_torch_still_works(tmp_path: Path) -> None:
    """In a fresh process: the resident pages of read-only library mappings go back to the
    kernel (a 24 MiB one only that process maps: its file-backed RSS drops by about that), and
    torch keeps computing the same numbers afterwards (what it needs faults back in). Pages
    shared with another process (this one imported torch too) stay: only unshared ones go."""
    out = subprocess.run([sys.executable, "-c", _PAGEOUT, str(tmp_path / "libfake.so")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    advised, before, after, total, _ = map(float, out.stdout.split())
    assert advised > 100 * 2**20  # libtorch alone maps more than that read-only
    assert after < before - 20, f"file-backed RSS {before:.0f} -> {after:.0f} MiB"
    assert total == 1134.0  # sum of x @ x.T for x = arange(12).reshape(3, 4), after the release


def test_releasing_library_pages_reads_any_maps_file_safely(tmp_path: Path) -> None:
    """Lines it does not understand, writable mappings and non-libraries are skipped; an
    unreadable maps file releases nothing. Never raises."""
    maps = tmp_path / "maps"
    maps.write_text("garbage\n7f00-7f01 rw-p 0 0:0 0 /lib/libwritable.so\n"
                    "7f02-7f03 r--p 0 0:0 0 /data/not-a-library.dat\n"
                    "7f04-7f05 r--p 0 0:0 0 [vdso]\n")
    assert release_library_pages(str(maps)) == 0
    assert release_library_pages(str(tmp_path / "missing")) == 0
