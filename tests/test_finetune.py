"""`medssl finetune task=classification`: frozen-feature probes from a bundle, a run id or random init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from training import tiny_overrides, write_training_data

from medssl.cli import main
from medssl.data.manifest import read_manifest, write_manifest
from medssl.downstream.evaluate import markdown_table, summarise
from medssl.export.bundle import export_bundle
from medssl.train.config import compose_pretrain_config
from medssl.train.trainer import Trainer


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Images labelled by their group (a bright spot = target), split by subject; plus a pretrained run."""
    folder = tmp_path_factory.mktemp("finetune")
    manifest = write_training_data(folder, volumes=2, images=12)
    rows = read_manifest(manifest).rows
    labelled_rows = []
    for row in rows:
        if row.dims == 2:
            number = int(Path(row.path).stem.removeprefix("img"))
            row = type(row)(**{**row.__dict__, "label": row.group, "split": "test" if number >= 8 else "train"})
        labelled_rows.append(row)
    labelled_path = folder / "labelled.csv"
    write_manifest(labelled_path, labelled_rows, folder / "data")
    config = compose_pretrain_config(tiny_overrides(manifest, folder, "trainer.max_steps=2", "run.name=pre"))
    result = Trainer(config, project_dir=folder).fit()
    return folder, labelled_path, result


def finetune(folder: Path, manifest: Path, *extra: str) -> int:
    return main(
        [
            "finetune",
            f"data.manifest={manifest}",
            f"data.cache_dir={folder / 'cache'}",
            "data.cache_workers=1",
            "data.preprocess.percentiles=[0,100]",
            "data.size=32",
            "model.encoder=resnet10",
            f"tracking_uri=sqlite:///{folder / 'mlruns' / 'mlflow.db'}",
            *extra,
        ]
    )


def evaluate(folder: Path, manifest: Path, out: Path, extra: list[str]) -> int:
    """``medssl evaluate`` on the labelled fixture's data at 32 px, writing to ``out``."""
    data = [f"data.manifest={manifest}", f"data.cache_dir={folder / 'cache'}", "data.cache_workers=1",
            "data.preprocess.percentiles=[0,100]", "data.size=32", f"out={out}"]  # fmt: skip
    return main(["evaluate", *extra, *data])


@pytest.mark.parametrize(
    ("protocol", "printed"),
    [("linear", "linear probe"), ("knn", "knn probe"), ("finetune", "full fine-tuning (3 steps)")],
)
def test_random_init_baseline_runs_and_logs(labelled, capsys, protocol, printed):
    folder, manifest, _ = labelled
    extra = ["finetune.steps=3", "finetune.batch_size=4"] if protocol == "finetune" else []
    assert finetune(folder, manifest, f"protocol={protocol}", "model.pretrained=none", *extra) == 0
    out = capsys.readouterr().out
    assert "random initialisation (resnet10, 2D)" in out
    assert f"{printed}, 8 training labels (1), 4 test: AUROC" in out
    mlflow = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("medssl-finetune").experiment_id])
    assert any(r.data.params.get("protocol") == protocol and "auroc" in r.data.metrics for r in runs)


def test_pretrained_bundle_and_run_id_load_every_tensor(labelled, capsys, tmp_path):
    folder, manifest, result = labelled
    bundle = export_bundle(str(result.output_dir), tmp_path / "bundle", log_to_mlflow=False)
    assert finetune(folder, manifest, f"model.pretrained={bundle}", "data.label_fraction=0.5") == 0
    out = capsys.readouterr().out
    n_tensors = len(torch.load(bundle / "models" / "model.pt", weights_only=True))
    assert f"matched {n_tensors}/{n_tensors} pretrained tensors" in out
    assert "4 training labels (0.5)" in out
    assert finetune(folder, manifest, f"model.pretrained={result.run_id}", "mlflow=false") == 0
    assert f"matched {n_tensors}/{n_tensors} pretrained tensors" in capsys.readouterr().out


def test_a_partial_pretrained_load_is_an_error(labelled, capsys, tmp_path):
    folder, manifest, result = labelled
    bundle = export_bundle(str(result.output_dir), tmp_path / "bundle", log_to_mlflow=False)
    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
    weights.pop("layer4.0.conv1.weight")
    torch.save(weights, bundle / "models" / "model.pt")
    assert finetune(folder, manifest, f"model.pretrained={bundle}", "mlflow=false") == 2
    err = capsys.readouterr().err
    assert "refusing a partial load" in err and "layer4.0.conv1.weight" in err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("protocol=svm", "protocol must be one of"),
        ("data.label_fraction=0", "label_fraction must be in (0, 1]"),
        ("task=regression", "no regression.yaml"),
        ("data.sizes=3", "data.sizes"),
    ],
)
def test_bad_finetune_settings_name_the_key(labelled, capsys, override, message):
    folder, manifest, _ = labelled
    assert finetune(folder, manifest, override, "mlflow=false") == 2
    assert message in capsys.readouterr().err


def test_evaluate_reports_mean_and_std_over_seeds_for_every_backbone(labelled, capsys, tmp_path):
    folder, manifest, result = labelled
    bundle = export_bundle(str(result.output_dir), tmp_path / "bundle", log_to_mlflow=False)
    code = evaluate(
        folder,
        manifest,
        tmp_path / "evaluation",
        [
            f"backbones={{pretrained: {bundle}, random: none}}",
            "encoder=resnet10",
            "label_fractions=[0.5,1.0]",
            "seeds=[0,1]",
            "protocols=[linear,knn,finetune]",
            "finetune.steps=2",
            "finetune.batch_size=4",
            f"tracking_uri=sqlite:///{folder / 'mlruns' / 'mlflow.db'}",
        ],
    )
    assert code == 0, capsys.readouterr().err
    report = (tmp_path / "evaluation" / "report.md").read_text(encoding="utf-8")
    rows = [line for line in report.splitlines() if line.startswith("| pretrained") or line.startswith("| random")]
    assert len(rows) == 2 * 3 * 2  # backbones x protocols x label fractions
    assert "matched" in report and "random initialisation (resnet10, 2D)" in report
    results = json.loads((tmp_path / "evaluation" / "results.json").read_text(encoding="utf-8"))["results"]
    assert len(results) == 2 * 3 * 2 * 2  # ... x seeds
    for row in results:  # per-class recall kept: it says which class an accuracy change comes from
        assert set(row["recall"]) == {"background", "target"}
        assert row["balanced_accuracy"] == pytest.approx(sum(row["recall"].values()) / 2)
    assert (tmp_path / "evaluation" / "auroc_vs_label_fraction.png").is_file()
    mlflow = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    run = mlflow.search_runs([mlflow.get_experiment_by_name("medssl-evaluate").experiment_id])[0]
    assert {a.path for a in mlflow.list_artifacts(run.info.run_id)} >= {"report.md", "results.json"}


def test_evaluate_draws_random_init_once_per_seed_reproducibly(labelled, capsys, tmp_path, monkeypatch):
    """The spread over seeds of random init includes the initialisation; a pretrained backbone is loaded once."""
    import medssl.downstream.evaluate as evaluate_module

    folder, manifest, result = labelled
    bundle = export_bundle(str(result.output_dir), tmp_path / "bundle", log_to_mlflow=False)
    loads: list[tuple[str, float]] = []
    original = evaluate_module.load_encoder

    def recording(source, *args, **kwargs):
        network, line = original(source, *args, **kwargs)
        loads.append((source, float(next(network.parameters()).detach().double().sum())))
        return network, line

    monkeypatch.setattr(evaluate_module, "load_encoder", recording)
    settings = [f"backbones={{pretrained: {bundle}, random: none}}", "encoder=resnet10", "label_fractions=[1.0]",
                "seeds=[0,1]", "protocols=[knn]", "mlflow=false"]  # fmt: skip
    for attempt in range(2):
        assert evaluate(folder, manifest, tmp_path / f"evaluation{attempt}", settings) == 0, capsys.readouterr().err
    assert [source for source, _ in loads] == [str(bundle), "none", "none"] * 2
    random_first, random_second = loads[1][1], loads[2][1]
    assert random_first != random_second  # seed 0 and seed 1 draw different networks
    assert loads[4:6] == loads[1:3]  # ... and the same ones on a second evaluation


def test_summary_is_the_mean_and_population_std_over_seeds():
    results = [
        {"backbone": "b", "protocol": "linear", "label_fraction": 0.1, "seed": s, "train_samples": 3,
         "auroc": a, "accuracy": 0.5, "balanced_accuracy": 0.5}
        for s, a in enumerate([0.6, 0.8, 1.0])
    ]  # fmt: skip
    (row,) = summarise(results)
    assert row["seeds"] == 3
    assert row["auroc"][0] == pytest.approx(0.8)
    assert row["auroc"][1] == pytest.approx(((0.04 + 0 + 0.04) / 3) ** 0.5)
    assert "| b | linear | 0.1 | 3 | 3 | 0.800 ± 0.163 |" in markdown_table([row])


def test_sepclr_spaces_are_probed_from_a_run_folder_and_refused_from_a_bundle(labelled, capsys, tmp_path):
    folder, manifest, result = labelled
    assert (
        finetune(folder, manifest, f"model.pretrained={result.output_dir}", "model.space=salient", "mlflow=false") == 0
    )
    out = capsys.readouterr().out
    assert "SepCLR salient head" in out and "matched" in out and "linear probe" in out
    bundle = export_bundle(str(result.output_dir), tmp_path / "bundle", log_to_mlflow=False)
    assert finetune(folder, manifest, f"model.pretrained={bundle}", "model.space=common", "mlflow=false") == 2
    assert "needs a pretraining run folder or checkpoint" in capsys.readouterr().err
    code = evaluate(
        folder,
        manifest,
        tmp_path / "evaluation",
        [
            f"backbones={{run: {result.output_dir}, random: none}}",
            "spaces=[common,salient]",
            "encoder=resnet10",
            "protocols=[linear]",
            "label_fractions=[1.0]",
            "seeds=[0]",
            "mlflow=false",
        ],
    )
    assert code == 0, capsys.readouterr().err
    report = (tmp_path / "evaluation" / "report.md").read_text(encoding="utf-8")
    for name in ("run/common", "run/salient", "random/common", "random/salient"):
        assert f"| {name} | linear |" in report


def test_space_encoder_returns_the_heads_outputs():
    from medssl.downstream.spaces import SpaceEncoder
    from medssl.models.joint import JointModel, JointModelConfig

    model = JointModel(JointModelConfig(encoder="resnet10")).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        common, salient = model.sep_heads(model.encoder(x))
        torch.testing.assert_close(SpaceEncoder(model, "common").eval()(x), common)
        torch.testing.assert_close(SpaceEncoder(model, "salient").eval()(x), salient)
    assert torch.allclose(common.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match=r"model\.space"):
        SpaceEncoder(model, "both")
