"""A bundle that ``medssl export`` writes is accepted and run by MONAI's own tools, offline and without medssl.

* ``python -m monai.bundle verify_metadata`` passes against the schema copy shipped in ``medssl/export/schema/`` (its
  md5 given, so MONAI does not download it), in a process whose network is cut; a metadata without a required field
  fails, so the schema is really applied.
* ``python -m monai.bundle run --config_file <bundle>/configs/inference.json --datalist ...`` embeds real PNG, JPEG and
  NIfTI files (written here, plus ../shared/data files when present) in a process that cannot import medssl (a
  stub ``medssl`` package that raises comes first on its path) nor reach the network, and its ``[N, D]`` embeddings
  equal those of medssl's own pipeline (:mod:`medssl.data.readers`, :mod:`medssl.data.preprocess`, display-oriented
  planes resized as ``medssl embed`` does, the trained encoder) to float tolerance.
* The 3D (inflated) bundle, a group-norm bundle (its ``run`` uses ``models/model.ts``, never medssl's builder) and a
  multi-window CT bundle run in-process through ``monai.bundle.run`` with the same agreement; ``models/model.ts``
  gives the state dict's features.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from hashlib import sha256
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import run as monai_run
from monai.bundle import verify_metadata
from PIL import Image
from training import tiny_overrides, write_training_data

from medssl.cli import main
from medssl.data.geometry import slice_to_display
from medssl.data.preprocess import PreprocessConfig, preprocess
from medssl.data.readers import LoadedImage, read_image_file, read_nifti
from medssl.export.backbones import ExportedBackbone, backbone_from_run_dir, inflate_to_3d
from medssl.export.bundle import export_bundle, write_bundle
from medssl.export.metadata import SCHEMA_MD5, SCHEMA_URL, schema_path, verify_metadata_offline
from medssl.models.encoders import create_encoder, monai_resnet
from medssl.train.config import compose_pretrain_config
from medssl.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ATOL = 1e-5  # features are O(1); float32 reductions in another order differ by ~1e-7


# ------------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny pretraining run (MR manifest: PNG images and NIfTI volumes) and its 2D bundle."""
    folder = tmp_path_factory.mktemp("conformance")
    manifest = write_training_data(folder, volumes=1, images=2)
    config = compose_pretrain_config(
        tiny_overrides(manifest, folder, "trainer.max_steps=1", "run.name=conformance", "logging=none")
    )
    result = Trainer(config, project_dir=folder).fit()
    bundle = export_bundle(str(result.output_dir), folder / "bundle", log_to_mlflow=False)
    return SimpleNamespace(
        folder=folder, result=result, bundle=bundle, exported=backbone_from_run_dir(result.output_dir)
    )


@pytest.fixture(scope="module")
def inputs(run) -> list[dict[str, str]]:
    """Files to embed: PNG (grey, grey stored as RGB, colour, 16-bit), JPEG, NIfTI in RAS, NIfTI with permuted and
    flipped axes and scaled int16 data; then a few real files of ../shared/data when present. Each is a datalist
    entry; some carry an id, the others get hashed file names."""
    folder = run.folder / "inputs" / "Doe^Jane"  # a folder named after a patient: must not reach any id
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:50, 0:44]
    grey = (90 + 60 * np.exp(-(((x - 22) / 15) ** 2 + ((y - 25) / 18) ** 2)) + rng.normal(0, 8, y.shape)).clip(0, 255)
    Image.fromarray(grey.astype(np.uint8)).save(folder / "Doe_Jane_chest.png")
    Image.fromarray(np.stack([grey.astype(np.uint8)] * 3, axis=-1)).save(folder / "grey_rgb.png")
    Image.fromarray((rng.random((40, 30, 3)) * 255).astype(np.uint8)).save(folder / "colour.png")
    Image.fromarray((grey * 200).astype(np.uint16)).save(folder / "sixteen_bit.png")
    Image.fromarray(grey.astype(np.uint8)).save(folder / "photo.jpg", quality=90)
    volume = rng.normal(0, 20, size=(20, 18, 14)).astype(np.float32)
    volume[4:16, 3:15, 2:12] += 300.0
    nib.save(nib.Nifti1Image(volume, np.diag([1.1, 0.9, 2.5, 1.0])), folder / "ras.nii.gz")
    permuted = np.array([[0, -1.1, 0, 10], [-0.9, 0, 0, 5], [0, 0, 2.5, -3], [0, 0, 0, 1]], dtype=float)
    nib.save(nib.Nifti1Image(volume, permuted), folder / "permuted.nii.gz")
    scaled = nib.Nifti1Image(rng.normal(100, 40, size=(16, 16, 10)).astype(np.int16), np.diag([-1.0, 1.0, 1.5, 1]))
    scaled.header.set_slope_inter(0.5, -20)
    nib.save(scaled, folder / "scaled.nii")
    entries = [{"image": str(path)} for path in sorted(folder.iterdir())]
    entries[0]["id"] = "case-0001"
    if SHARED.is_dir():
        real = [
            *sorted((SHARED / "msd-hippocampus" / "images").glob("*.nii.gz"))[:2],
            *sorted((SHARED / "kermany-cxr-224" / "train" / "PNEUMONIA").glob("*.jpeg"))[:2],
            *sorted((SHARED / "mednist-subset" / "HeadCT").glob("*.jpeg"))[:1],
        ]
        entries += [{"image": str(path)} for path in real]
    return entries


def _blocked_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot import medssl (a stub package that raises comes first on the path) nor
    open a network connection (``sitecustomize`` replaces the socket calls)."""
    blocker = tmp_path / "blocker"
    (blocker / "medssl").mkdir(parents=True)
    (blocker / "medssl" / "__init__.py").write_text("raise ImportError('medssl is blocked in this process')\n")
    (blocker / "sitecustomize.py").write_text(
        "import socket\n"
        "def _refuse(*args, **kwargs):\n"
        "    raise OSError('network access is blocked in this process')\n"
        "socket.socket.connect = _refuse\n"
        "socket.create_connection = _refuse\n"
        "socket.getaddrinfo = _refuse\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = str(blocker)
    return env


# ------------------------------------------------------------------------------------------------------------ reference
def _read(path: str, modality: str) -> LoadedImage:
    image = read_nifti(Path(path)) if path.endswith((".nii", ".nii.gz")) else read_image_file(Path(path))
    image.modality = modality
    return image


def medssl_planes(path: str, config: dict[str, Any], modality: str) -> np.ndarray:
    """medssl's preprocessing of one file as display-oriented planes ``[C, P, H, W]`` (P = 1 for an image, the axial
    slices of a volume): :func:`medssl.data.preprocess.preprocess`, then :func:`slice_to_display` per slice."""
    settings = {k: config[k] for k in ("spacing", "max_side_2d", "ct_windows", "percentiles")}
    array = preprocess(_read(path, modality), PreprocessConfig(**settings)).array
    if array.ndim == 3:
        return array[:, None]
    return np.stack([np.stack([slice_to_display(c[:, :, k]) for k in range(c.shape[2])]) for c in array])


def medssl_embedding(network: torch.nn.Module, planes: np.ndarray, channels: list[int], size: int | None, dims: int):
    """``[D]``: a 2D encoder on every plane resized as ``medssl embed`` does (bilinear, anti-aliased), then the mean
    over the planes; a 3D encoder on the whole ``[C, D, H, W]`` volume."""
    x = torch.from_numpy(np.ascontiguousarray(planes[channels])).transpose(0, 1)  # [P, C, H, W]
    if size is not None:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        if dims == 3:
            return network.eval()(x.transpose(0, 1)[None])[0].numpy()
        return network.eval()(x).numpy().mean(axis=0, dtype=np.float64).astype(np.float32)


def bundle_network(bundle: Path) -> torch.nn.Module:
    config = json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8"))
    network_def = config["network_def"]
    kwargs = network_def.get("backbone_config") or {k: v for k, v in network_def.items() if not k.startswith("_")}
    net = monai_resnet(kwargs)
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True), strict=True)
    return net.eval()


def check_agreement(bundle: Path, table: dict[str, Any], entries: list[dict[str, str]], **override: Any) -> float:
    """The bundle's embeddings against medssl's pipeline on the same files; returns the largest difference."""
    config = {**json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8")), **override}
    network = bundle_network(bundle)
    dims = int(json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))["medssl"]["spatial_dims"])
    expected = np.stack([
        medssl_embedding(network, medssl_planes(e["image"], config, config["modality"]), config["channels"],
                         config["image_size"], dims)
        for e in entries
    ])  # fmt: skip
    got = table["embedding"].numpy()
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=ATOL)
    return float(np.abs(got - expected).max())


def run_in_process(bundle: Path, out: Path, monkeypatch: pytest.MonkeyPatch, **override: Any) -> dict[str, Any]:
    """``monai.bundle.run`` (what ``python -m monai.bundle run`` calls) in this process; the table it wrote."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the workflow adds the bundle root to sys.path
    monai_run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle),
              output_file=str(out), **override)  # fmt: skip
    return torch.load(out, weights_only=True)


# ------------------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def cli(run, inputs, tmp_path_factory):
    """The two ``python -m monai.bundle`` commands on the 2D bundle, in parallel, in processes that can neither import
    medssl nor reach the network (checked first): ``verify_metadata`` with the shipped schema, and ``run`` over a
    datalist of ``inputs``."""
    tmp = tmp_path_factory.mktemp("cli")
    bundle = run.bundle
    env = _blocked_env(tmp)
    clean = tmp / "cwd"
    clean.mkdir()
    datalist = tmp / "datalist.json"
    datalist.write_text(json.dumps({"test": inputs}), encoding="utf-8")
    out = tmp / "embeddings.pt"
    python = sys.executable
    sanity = subprocess.run(
        [python, "-c", "import socket\ntry:\n    import medssl\nexcept ImportError:\n    pass\nelse:\n    raise "
         "SystemExit('medssl importable')\ntry:\n    socket.create_connection(('github.com', 443), timeout=5)\n"
         "except OSError:\n    pass\nelse:\n    raise SystemExit('network reachable')\n"],
        env=env, cwd=clean, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert sanity.returncode == 0, sanity.stdout + sanity.stderr
    start = time.perf_counter()
    verify = subprocess.Popen(
        [python, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(bundle / "configs" / "metadata.json"),
         "--filepath", str(schema_path()), "--hash_val", SCHEMA_MD5, "--hash_type", "md5"],
        env=env, cwd=clean, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    runner = subprocess.Popen(
        [python, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
         "--bundle_root", str(bundle), "--datalist", str(datalist), "--output_file", str(out)],
        env=env, cwd=clean, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    verified, ran = verify.communicate(timeout=300)[0], runner.communicate(timeout=300)[0]
    table = torch.load(out, weights_only=True) if runner.returncode == 0 else None
    return SimpleNamespace(verify=(verify.returncode, verified), run=(runner.returncode, ran), table=table,
                           seconds=time.perf_counter() - start)  # fmt: skip


def test_monai_verify_metadata_passes_offline_without_medssl(cli):
    returncode, output = cli.verify
    assert returncode == 0, output[-3000:]
    assert "metadata is verified with no error" in output and "skipped downloading" in output


def test_monai_bundle_run_gives_medssl_features_without_medssl(run, inputs, cli):
    returncode, output = cli.run
    assert returncode == 0, output[-5000:]
    table = cli.table
    assert table["format"] == "medssl-embeddings v1" and table["level"].count("volume") >= 3
    # ids: the datalist's where given, else 16 hex digits of a hash; never a path or a name
    assert table["id"][0] == "case-0001" and len(set(table["id"])) == len(inputs)
    for given in table["id"][1:]:
        assert len(given) == 16 and all(c in "0123456789abcdef" for c in given)
    assert "Doe" not in json.dumps({k: v for k, v in table.items() if k not in ("embedding", "slice")})
    difference = check_agreement(run.bundle, table, inputs)
    print(f"\nmonai.bundle run: {len(inputs)} files, [N, D] = {list(table['embedding'].shape)}, max |difference| "
          f"to medssl's pipeline {difference:.2e}; verify_metadata + run in parallel {cli.seconds:.1f} s")  # fmt: skip


@pytest.mark.real_data
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data folder {SHARED} not found (only on dev/CI machines)")
def test_real_files_of_shared_data_agree(run, inputs, cli):
    """MSD hippocampus NIfTI, Kermany chest X-rays (grey stored as RGB JPEG) and MedNIST head CT, in the same run."""
    assert cli.table is not None, cli.run[1][-5000:]
    real = [i for i, e in enumerate(inputs) if str(SHARED) in e["image"]]
    assert len(real) == 5
    subset = {**cli.table, "embedding": cli.table["embedding"][real]}
    difference = check_agreement(run.bundle, subset, [inputs[i] for i in real])
    print(f"\n../shared/data: {len(real)} files, max |difference| {difference:.2e}")


def test_verify_metadata_applies_the_schema_and_never_downloads(run, tmp_path, monkeypatch):
    meta = json.loads((run.bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert meta["schema"] == SCHEMA_URL
    assert meta["required_packages_version"].keys() == {"nibabel", "pillow"}  # a plain MONAI ResNet: no medssl
    assert "not for diagnosis" in meta["intended_use"] and meta["license"].startswith("unspecified")
    assert meta["network_data_format"]["inputs"]["image"]["channel_def"] == {"0": "MR"}

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("verify_metadata tried to download the schema")

    monkeypatch.setattr("monai.apps.utils._download_with_progress", refuse)
    local = {"filepath": str(schema_path()), "hash_val": SCHEMA_MD5, "hash_type": "md5"}
    verify_metadata(meta_file=str(run.bundle / "configs" / "metadata.json"), **local)
    with pytest.raises(AssertionError, match="tried to download"):  # without the local copy it would download
        verify_metadata(meta_file=str(run.bundle / "configs" / "metadata.json"), filepath=str(tmp_path / "s.json"))
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps({k: v for k, v in meta.items() if k != "authors"}), encoding="utf-8")
    with pytest.raises(ValueError, match="authors"):
        verify_metadata(meta_file=str(broken), **local)
    edited = tmp_path / "schema.json"
    edited.write_text(schema_path().read_text(encoding="utf-8").replace('"authors",', ""), encoding="utf-8")
    with pytest.raises(Exception, match="hash check"):  # an edited copy is refused, not used
        verify_metadata(meta_file=str(broken), **{**local, "filepath": str(edited)})


def test_torchscript_gives_the_state_dict_features(run):
    net = bundle_network(run.bundle)
    scripted = torch.jit.load(str(run.bundle / "models" / "model.ts"))
    images = torch.rand(3, 1, 40, 36)
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), net(images), rtol=1e-5, atol=1e-6)
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(run.bundle / "models" / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["medssl"]["run_name"] == "conformance"


def test_3d_bundle_embeds_volumes_whole(run, inputs, tmp_path, monkeypatch):
    bundle = write_bundle(inflate_to_3d(run.exported), tmp_path / "bundle3d")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    verify_metadata_offline(bundle / "configs" / "metadata.json")
    assert meta["references"][-1].startswith("Carreira & Zisserman")
    assert meta["medssl"]["inference"]["image_size"] is None  # volumes as preprocessed
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    source = Path(inputs[0]["image"]).parent
    for name in ("Doe_Jane_chest.png", "permuted.nii.gz", "sub/ras.nii.gz"):
        (folder / name).write_bytes((source / Path(name).name).read_bytes())
    table = run_in_process(bundle, tmp_path / "e3.pt", monkeypatch, input_dir=str(folder))
    entries = [{"image": str(folder / name)} for name in ("Doe_Jane_chest.png", "permuted.nii.gz", "sub/ras.nii.gz")]
    assert table["level"] == ["image", "volume", "volume"]  # the folder's files, sorted, subfolders included
    assert table["id"][2] == sha256(b"sub/ras").hexdigest()[:16]  # the path in the folder without its suffix
    check_agreement(bundle, table, entries)
    volume = torch.rand(1, 1, 6, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(bundle / "models" / "model.ts"))(volume),
                                   bundle_network(bundle)(volume), rtol=1e-5, atol=1e-6)  # fmt: skip


def test_group_norm_bundle_runs_from_torchscript_not_medssl(run, inputs, tmp_path, monkeypatch):
    """Its ``network_def`` is medssl's builder (listed in required_packages_version); the run never builds it."""
    encoder = create_encoder("resnet10", in_channels=1, norm="group")
    exported = ExportedBackbone(
        network_kwargs={**encoder.backbone_config, "norm": list(encoder.backbone_config["norm"])},
        weights=encoder.backbone.state_dict(),
        out_dim=int(encoder.stage_channels[-1]),
        config=run.exported.config,
        run_id=None,
        run_name="group",
    )
    bundle = write_bundle(exported, tmp_path / "group")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert "medssl" in meta["required_packages_version"]
    entries = inputs[:4]
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"test": entries}), encoding="utf-8")
    sabotaged = {"_target_": "no.such.module.Network"}  # building network_def would fail
    table = run_in_process(bundle, tmp_path / "g.pt", monkeypatch, datalist=str(datalist), network_def=sabotaged)
    check_agreement(bundle, table, entries)


def test_several_ct_windows_name_each_channel_and_pick_one(run, inputs, tmp_path, monkeypatch):
    config = json.loads(json.dumps(run.exported.config))
    config["data"]["preprocess"]["ct_windows"] = [[40, 400], [-600, 1500]]
    config["data"]["manifest"] = None  # modality unknown here: a one-channel encoder -> OT, overridden below
    exported = ExportedBackbone(**{**vars(run.exported), "config": config})
    bundle = write_bundle(exported, tmp_path / "ct")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    channel_def = meta["network_data_format"]["inputs"]["image"]["channel_def"]
    assert "CT window 40/400" in channel_def["0"] and "CT window -600/1500" in channel_def["0"]
    entries = [e for e in inputs if e["image"].endswith((".nii.gz", ".png"))][:4]
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"test": entries}), encoding="utf-8")
    table = run_in_process(bundle, tmp_path / "ct.pt", monkeypatch, datalist=str(datalist), modality="CT",
                           channels=[1])  # fmt: skip
    assert table["modality"] == ["CT"] * len(entries)
    check_agreement(bundle, table, entries, modality="CT", channels=[1])


def test_resampled_inputs_agree_approximately(run, inputs, tmp_path, monkeypatch):
    """Spacing and 2D downscaling: MONAI's sampled Gaussian against ITK's recursive one (and the border slice that
    medssl's resampler leaves at 0): close, not equal."""
    entries = [e for e in inputs if "Doe" in e["image"] and e["image"].endswith((".nii.gz", "chest.png"))]
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"test": entries}), encoding="utf-8")
    override = {"spacing": [1.6, 1.4, None], "max_side_2d": 24}
    table = run_in_process(run.bundle, tmp_path / "r.pt", monkeypatch, datalist=str(datalist), **override)
    config = {**json.loads((run.bundle / "configs" / "inference.json").read_text(encoding="utf-8")), **override}
    network = bundle_network(run.bundle)
    for got, entry in zip(table["embedding"].numpy(), entries, strict=True):
        planes = medssl_planes(entry["image"], config, "MR")
        want = medssl_embedding(network, planes, [0], config["image_size"], 2)
        cosine = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
        assert cosine > 0.999, (entry["image"], cosine)


def test_run_without_files_says_what_to_set(run, tmp_path, monkeypatch):
    with pytest.raises(RuntimeError) as caught:
        run_in_process(run.bundle, tmp_path / "none.pt", monkeypatch)
    assert "set input_dir" in repr(caught.value.__cause__) + str(caught.getrepr())
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError) as caught:
        run_in_process(run.bundle, tmp_path / "none.pt", monkeypatch, input_dir=str(tmp_path / "empty"))
    assert "NIfTI volume to embed" in str(caught.getrepr())


def test_export_meta_options_fill_the_metadata(run, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["export", str(run.result.output_dir), "--out", str(out), "--no-mlflow", "--meta", "authors=A. Author",
                 "--meta", "license=CC-BY-4.0", "--meta", "version=1.2.0", "--meta", "changelog=second export",
                 "--meta", "copyright=Copyright 2026 Example Hospital"]) == 0  # fmt: skip
    meta = json.loads((out / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert (meta["authors"], meta["license"], meta["version"]) == ("A. Author", "CC-BY-4.0", "1.2.0")
    assert meta["changelog"] == {"1.2.0": "second export"} and meta["copyright"].endswith("Example Hospital")
    assert "CC-BY-4.0" in (out / "docs" / "README.md").read_text(encoding="utf-8")
    assert main(["export", str(run.result.output_dir), "--out", str(tmp_path / "c"), "--meta", "owner=me"]) == 2
    assert "unknown key" in capsys.readouterr().err and not (tmp_path / "c").exists()
