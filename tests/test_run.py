"""End to end: `kedro run` and `kedro viz build` on a copy of the project, as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from cartridges.tables import write_parquet

ROOT = Path(__file__).resolve().parents[1]
KEDRO = [sys.executable, "-m", "kedro"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The project files (config, example corpus, embedded model, code) in a fresh directory."""
    copy = tmp_path_factory.mktemp("project")
    tracked = subprocess.run(
        [
            "git",
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
            "conf",
            "data",
            "src",
            "pyproject.toml",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for relative in tracked:
        if not (ROOT / relative).exists():  # deleted in the working tree, not yet committed
            continue
        (copy / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, copy / relative)
    return copy


def _run(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [*KEDRO, *args], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )


# A reduced default run: fewer conversations and steps, no size sweep, QA only. It is the
# project's regression test that the method works on the embedded toy-world model, not only runs.
REDUCED = ",".join(
    [
        "self_study.num_conversations=768",
        "distill_training.train.max_steps=700",
        "distill_training.sweep_compressions=[]",
        "evaluation.tasks=[qa]",
        "evaluation.decode_batch_sizes=[1]",
    ]
)


@pytest.mark.slow
def test_default_pipeline_runs_from_a_fresh_copy_and_the_cartridge_recovers_icl(project):
    result = _run(project, "run", "--params", REDUCED)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Evaluation report" in result.stdout + result.stderr
    reports = list(
        (project / "data/08_reporting/evaluation_report.csv").glob("*/evaluation_report.csv")
    )
    assert len(reports) == 1
    report = pd.read_csv(reports[0])
    assert {"icl", "no_context", "cartridge", "truncated_icl_p33"} <= set(report["method"])
    accuracy = report[report["task"] == "qa"].set_index("method")["exact_match"]
    assert accuracy["icl"] >= 0.9  # the toy model reads its document
    assert accuracy["no_context"] <= 0.1  # and cannot guess it
    # A cartridge 4x smaller than the document keeps most of the in-context accuracy, far
    # above the document cut to the same size.
    assert accuracy["cartridge"] >= 0.75 * accuracy["icl"], accuracy.to_dict()
    assert accuracy["cartridge"] > accuracy["truncated_icl_p33"] + 0.25, accuracy.to_dict()
    assert len(list((project / "data/06_models/cartridge.safetensors").iterdir())) == 1
    assert len(list((project / "data/08_reporting/tradeoff_plot.png").glob("*/*.png"))) == 1
    assert (project / "mlflow.db").exists()  # tracking went to the local sqlite store


def _versions(project: Path, path: str) -> list[str]:
    return sorted(child.name for child in (project / path).iterdir() if child.is_dir())


@pytest.mark.slow
def test_the_cartridge_records_its_lineage_and_mlflow_the_run(project):
    # Runs after the default pipeline above: one version of everything exists.
    from cartridges import lineage

    (version,) = _versions(project, "data/06_models/cartridge.safetensors")
    cartridge = project / "data/06_models/cartridge.safetensors" / version / "cartridge.safetensors"
    record = lineage.read(cartridge)
    assert record["dataset"] == "cartridge" and record["version"] == version
    assert record["package_version"] and "git_commit" in record
    for name, path in {
        "corpus": "data/02_intermediate/corpus.parquet",
        "chunk_set": "data/02_intermediate/chunk_set.parquet",
        "conversations": "data/03_primary/conversations",
        "teacher_logprobs": "data/04_feature/teacher_logprobs",
    }.items():
        assert record["inputs"][name]["version"] == _versions(project, path)[-1], name
        assert record["inputs"][name]["digest"]
    run_ids = {record["inputs"][n]["run_id"] for n in ("conversations", "teacher_logprobs")}
    assert len(run_ids) == 1  # one self-study run wrote both
    (report,) = (project / "data/08_reporting/evaluation_report.csv").glob("*/*.csv")
    rows = pd.read_csv(report)
    assert set(rows.loc[rows["method"] == "cartridge", "cartridge_version"]) == {version}

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("cartridges").experiment_id], "", max_results=1
    )
    tags = run.data.tags
    assert tags["pipeline"] == "__default__" and tags["model.name"].endswith("toy_world")
    assert tags["model.fingerprint"] and "git_commit" in tags and tags["package_version"]
    assert tags["input.conversations.version"] == record["inputs"]["conversations"]["version"]
    inputs = {d.dataset.name.split("@")[0] for d in run.inputs.dataset_inputs}
    assert {"corpus", "conversations"} <= inputs
    artifacts = {
        a.path
        for folder in ("cartridge", "evaluation")
        for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {"cartridge/cartridge.safetensors", "evaluation/evaluation_report.csv"} <= artifacts
    assert "evaluation/tradeoff_plot.png" in artifacts
    metrics = run.data.metrics
    assert "self_study.conversations" in metrics and "document_prep.num_documents" in metrics
    assert any(name.startswith("evaluation.cartridge.qa.") for name in metrics)


@pytest.mark.slow
def test_conversations_and_targets_of_different_runs_are_refused(project):
    # Forge a second self-study run: the same targets, another run id.
    root = project / "data/04_feature/teacher_logprobs"
    (original,) = _versions(project, "data/04_feature/teacher_logprobs")
    forged = "2020-01-01T00.00.00.000Z"
    shutil.copytree(root / original, root / forged)
    manifest = root / forged / "teacher_logprobs" / "_manifest.json"
    content = json.loads(manifest.read_text())
    content["attrs"]["run_id"] = "another-run-768"
    manifest.write_text(json.dumps(content))
    (conversations,) = _versions(project, "data/03_primary/conversations")
    pinned = f"conversations:{conversations},teacher_logprobs:{forged}"
    result = _run(project, "run", "--pipelines", "distill_training", "--load-versions", pinned)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"version {conversations}" in output and f"version {forged}" in output
    assert f"teacher_logprobs:{original}" in output  # the --load-versions that fixes it
    assert "Loading weights" not in output  # refused before any model loaded
    shutil.rmtree(root / forged)


@pytest.mark.slow
def test_a_chunk_set_of_another_corpus_is_refused_beside_these_conversations(project):
    """A chunk set of another corpus paired with matching conversations trained with rc 0, and
    the lineage recorded the foreign input without a word."""
    root = project / "data/02_intermediate/chunk_set.parquet"
    (original,) = _versions(project, "data/02_intermediate/chunk_set.parquet")
    forged = "2020-01-01T00.00.00.000Z"
    chunks = pd.read_parquet(root / original / "chunk_set.parquet")
    chunks["text"] = chunks["text"] + " And one more record."
    (root / forged).mkdir()
    write_parquet(
        pa.Table.from_pandas(chunks, preserve_index=False), root / forged / "chunk_set.parquet"
    )
    try:
        result = _run(
            project, "run", "--pipelines", "distill_training", "--load-versions",
            f"chunk_set:{forged}", "--params", REDUCED,
        )  # fmt: skip
    finally:
        shutil.rmtree(root / forged)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert f"was made from chunk_set version {original}" in output
    assert f"reads chunk_set version {forged}" in output
    assert f'--load-versions "chunk_set:{original}"' in output


@pytest.mark.slow
def test_a_failed_save_leaves_no_partial_set_as_the_latest(project):
    """teacher_logprobs failing to save left the run's conversations alone as the latest."""
    before = _versions(project, "data/03_primary/conversations")
    targets = project / "data/04_feature/teacher_logprobs"
    kept = targets.with_name("teacher_logprobs.kept")
    targets.rename(kept)
    targets.write_text("a file where the version folders go: every save there fails")
    try:  # the same run as the default one: its batches are read back from the shard cache
        result = _run(project, "run", "--pipelines", "self_study", "--params", REDUCED)
    finally:
        targets.unlink()
        kept.rename(targets)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Removed conversations version" in output and "'teacher_logprobs']" in output
    assert _versions(project, "data/03_primary/conversations") == before


@pytest.mark.slow
def test_viz_build_renders_the_pipelines(project):
    result = _run(project, "viz", "build")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    main = project / "build" / "api" / "main"
    assert main.exists()
    graph = main.read_text()
    for node in ("load_documents_node", "synthesize_conversations_node", "distill_cartridge_node"):
        assert node.split("_node")[0] in graph
    api = json.loads(graph)
    assert "questions" in {n["name"] for n in api["nodes"]}  # an input of the catalog now
    assert {"raw", "intermediate", "primary", "feature", "models", "reporting"} <= set(
        api["layers"]
    )


@pytest.mark.slow
def test_torchrun_trains_with_two_processes_and_rank_zero_writes(project):
    # Runs after the default pipeline above, so conversations and teacher_logprobs exist.
    before = set((project / "data/06_models/cartridge.safetensors").iterdir())
    env_args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [
            sys.executable,
            *env_args,
            "-m",
            "kedro",
            "run",
            "--pipelines",
            "distill_training",
            "--params",
            # 16 rows per step = 4 per micro-batch x 2 accumulation x 2 processes
            "distill_training.train.micro_batch_size=4,distill_training.train.max_steps=20,"
            "distill_training.sweep_compressions=[]",
        ],
        cwd=project,
        env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "rank 1 of 2" in result.stdout + result.stderr
    new = set((project / "data/06_models/cartridge.safetensors").iterdir()) - before
    assert len(new) == 1  # one version, written by rank 0 only


@pytest.mark.slow
def test_the_run_script_prints_no_known_third_party_warning_and_no_colour_codes(project):
    """``scripts/run.sh`` runs ``python -m cartridges``: the known warnings are filtered before
    Kedro loads its plugins, and a log written to a file carries no ANSI codes."""
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "cartridges", "--pipelines", "document_prep"]
    result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "\x1b[" not in output
    for known in ("register_new_resolver", "Add type hints", "Union type hint"):
        assert known not in output, known


# The multi_document environment with a quarter of the conversations (about 4 minutes). Its
# claims, at this size: the cartridge of a corpus four times the context answers far more than
# ICL cut to the context (measured 0.70 vs 0.22), and two cartridges trained separately answer
# together (0.50, against 0.77 and 0.75 alone); routed by BM25, one document cartridge per
# question answers better than the whole corpus's cartridge of the same size.
MULTI_REDUCED = ",".join(
    [
        "self_study.num_conversations=3072",
        "distill_training.train.epochs=12",
        "evaluation.decode_batch_sizes=[1]",
    ]
)


@pytest.mark.slow
def test_the_multi_document_environment_reads_past_the_context_and_composes(project):
    # Last: the other tests read the default run's MLflow run as the latest one.
    result = _run(project, "run", "--env", "multi_document", "--params", MULTI_REDUCED)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    data = project / "data/multi_document"
    # Its artifacts live apart from the default run's: one version of each, under its folder.
    (report_path,) = (data / "08_reporting/evaluation_report.csv").glob("*/*.csv")
    report = pd.read_csv(report_path)
    rows = report[report["task"] == "qa"].set_index("method")
    accuracy = rows["exact_match"]
    assert "truncated from 515 to" in rows.loc["icl", "note"]  # the corpus is 4x the context
    assert rows.loc["cartridge", "kv_tokens"] <= 515 / 8  # at 8x of the whole corpus
    # Long corpus: trained on windows that fit the context, the cartridge answers about the
    # whole corpus far better than ICL, which sees the first fifth of it.
    assert accuracy["cartridge"] >= 2 * accuracy["icl"], accuracy.to_dict()
    # Composition: each document's cartridge on its own questions, both concatenated on both.
    assert rows.loc["document_town_0", "questions"] == "town_0"
    assert rows.loc["composition", "questions"] == "town_0+town_1"
    alone = (accuracy["document_town_0"] + accuracy["document_town_1"]) / 2
    assert accuracy["composition"] >= 0.55 * alone, accuracy.to_dict()
    assert accuracy["composition"] > accuracy["no_context"] + 0.2, accuracy.to_dict()
    # Routing: the library of four, one cartridge per question, on the questions about any.
    assert rows.loc["routed_top1", "questions"] == "town_0+town_1+town_2+town_3"
    assert rows.loc["sweep_p32", "kv_tokens"] <= rows.loc["routed_top1", "kv_tokens"] <= 33
    routing = report[report["task"] == "routing"].set_index("method")["quality"]
    assert routing["routed_top1"] >= 0.9, routing.to_dict()
    assert accuracy["routed_top1"] >= 0.9 * accuracy["oracle_selection"], accuracy.to_dict()
    assert accuracy["routed_top1"] > accuracy["sweep_p32"], accuracy.to_dict()  # equal KV
    saved = (data / "06_models/document_cartridges").glob("*/**/*.safetensors")
    assert sorted(path.stem for path in saved) == [f"town_{k}" for k in range(4)]
