"""Table specs (experiments/tables/*.yaml) and scripts/reproduce.py end to end on synthetic data, with a resume."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from meta.experiments.tables import (
    TableError,
    check_cells,
    iterations_for_minutes,
    load_table,
    missing_pins,
    preset_exists,
    protocol_status,
    replace_block,
    run_action,
)
from meta.training.checkpoints import load_checkpoint
from meta.training.config import load_config

REPO = Path(__file__).resolve().parents[1]
TABLES = sorted((REPO / "experiments" / "tables").glob("*.yaml"))
SPEC_CELLS = [(path, cell) for path in TABLES for cell in load_table(path).cells]
#: tiny runs: synthetic data, small validation and test sets, the vmap driver (no timing of candidates)
TINY = ["data.dataset=synthetic", "data.synthetic_classes=20", "train.meta_batch=2", "train.log_every=1",
        "train.val_tasks=5", "train.checkpoint_every=2", "eval.tasks=10", "eval.batch_size=10", "inner.test_steps=1",
        "progress=false", "device=cpu", "driver=vmap"]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True)


def write_spec(path: Path, cells: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"title": "tiny table", "source": "this test", "cells": cells}))
    return path


def cell(name: str, preset: str, accuracy: float = 98.0, pm: float | None = 0.5, **extra) -> dict:
    return {"name": name, "preset": preset, "paper": {"accuracy": accuracy, "pm": pm, "pm_kind": "task_ci95"},
            "source": {"paper": "p", "table": "t", "code": "c"}, **extra}


def test_the_committed_tables_cover_the_maml_and_fomaml_omniglot_cells():
    names = {path.stem: [c.preset for c in load_table(path).cells] for path in TABLES}
    assert names["maml_omniglot"] == [*(f"maml_omniglot_{s}" for s in ("5w1s", "5w5s", "20w1s", "20w5s")),
                                      "maml_mlp_omniglot_5w1s", "maml_mlp_omniglot_5w5s"]
    assert names["fomaml_omniglot"] == [f"fomaml_omniglot_{s}" for s in ("5w1s", "5w5s", "20w1s", "20w5s")]
    fomaml = load_table(REPO / "experiments/tables/fomaml_omniglot.yaml").cells
    assert [(c.paper_accuracy, c.paper_pm) for c in fomaml] == [(98.3, 0.5), (99.2, 0.2), (89.4, 0.5), (97.9, 0.1)]
    assert all("Table 2" in c.source["table"] for c in fomaml)  # Omniglot is Table 2 in Nichol et al.


#: every paper table of issue 12 and its cells' presets, in order
FAMILY_TABLES = {
    "reptile_omniglot": [f"reptile_omniglot_{c}" for c in ("5w1s", "5w5s", "20w1s", "20w5s")] * 2,
    "metasgd_omniglot": [f"metasgd_omniglot_{c}" for c in ("5w1s", "5w5s", "20w1s", "20w5s")],
    "anil_omniglot": ["anil_omniglot_20w1s", "anil_omniglot_20w5s"],
    "mamlpp_omniglot": [f"mamlpp_omniglot_{c}" for c in ("5w1s", "5w5s", "20w1s", "20w5s")],
    "imaml_omniglot": [f"imaml_omniglot_{c}" for c in ("5w1s", "5w5s", "20w1s", "20w5s")],
    "protonets_omniglot": [f"protonets_omniglot_{c}" for c in ("5w1s", "5w5s", "20w1s", "20w5s")],
    "mnist_cross_domain": ["mnist_cross_domain_10w1s"],
}

#: the tables whose cells run the original code's protocol with no deviation left (every knob is a config key)
EXPRESSIBLE = {"mamlpp_omniglot"}


@pytest.mark.parametrize("table", sorted(FAMILY_TABLES))
def test_the_committed_tables_cover_the_algorithm_family_and_the_mnist_anchor(table):
    spec = load_table(REPO / "experiments" / "tables" / f"{table}.yaml")
    assert [c.preset for c in spec.cells] == FAMILY_TABLES[table]
    if table == "protonets_omniglot":  # fully expressible: two stages (early stopping, retraining), no deviation
        assert all(not c.deviations and c.retrain for c in spec.cells)
        assert all(protocol_status(c.preset, load_config([f"preset={c.preset}"]))["label"] == "as published"
                   for c in spec.cells)
        return
    # a cell whose protocol is not fully expressible names what deviates, so it can never be labelled "as
    # published" (the known deviations come first in every run's protocol label); a cell without deviations run
    # as its preset is. MAML++'s table is fully expressible since eval.checkpoint=ensemble and
    # train.epoch_iterations (tests/test_mamlpp_protocol.py); Reptile's 5w1s cells since model.padding=tf_same
    assert (table in EXPRESSIBLE) == all(not c.deviations for c in spec.cells)
    for c in spec.cells:
        status = protocol_status(c.preset, load_config([f"preset={c.preset}", *c.overrides]), c.deviations,
                                 c.overrides)
        if not c.deviations:
            assert status["label"] == "as published"
            continue
        assert status["label"].startswith("deviates: ") and status["deviations"][:len(c.deviations)] == [
            f"{d} (no knob)" for d in c.deviations]


def test_reptile_rows_share_presets_and_differ_in_the_paper_number_and_transduction():
    cells = {c.name: c for c in load_table(REPO / "experiments/tables/reptile_omniglot.yaml").cells}
    for shape in ("5w1s", "5w5s", "20w1s", "20w5s"):
        trans, non = cells[f"transductive_{shape}"], cells[f"nontransductive_{shape}"]
        assert trans.preset == non.preset and trans.paper_accuracy > non.paper_accuracy
        # the rows differ in eval.transductive (reptile.py L126-133), a key: neither lists it as a deviation
        assert (trans.requires["eval.transductive"], non.requires["eval.transductive"]) == (True, False)
        assert "eval.transductive=false" in non.overrides and trans.deviations == non.deviations
        assert {c.pm_kind for c in (trans, non)} == {"unstated"}  # docs/protocols.md#reptile: not a 95% task CI
    # the non-transductive cell's overrides (eval.transductive=false and the paper's number) are its protocol, not a
    # deviation from it; the same run labelled against the bare preset does deviate
    non = cells["nontransductive_5w1s"]
    run = load_config([f"preset={non.preset}", *non.overrides, "train.iterations=10"])
    assert run.reference.accuracy == 95.39 and not run.eval.transductive
    assert protocol_status(non.preset, run, expected=non.overrides)["label"] == (
        "reduced schedule (10 of 100000 iterations)")
    assert protocol_status(non.preset, run)["label"] == (
        "deviates: eval.transductive=False (preset: True); reduced schedule (10 of 100000 iterations)")


@pytest.mark.parametrize("path,cell", SPEC_CELLS, ids=[f"{p.stem}-{c.name}" for p, c in SPEC_CELLS])
def test_every_table_preset_loads_and_pins_the_knobs_its_table_requires(path, cell):
    assert preset_exists(cell.preset), f"{path.name}: cell {cell.name} names preset {cell.preset}, not in configs/"
    assert cell.requires, f"{path.name}: cell {cell.name} requires nothing"
    assert missing_pins(cell) == []
    # the preset's own reference (with the cell's overrides) agrees with the table's paper number; its ci95 is the
    # paper's ± only where that is a 95% task CI (reference.ci95 means one), else null
    reference = load_config([f"preset={cell.preset}", *cell.overrides]).reference
    assert reference.accuracy == cell.paper_accuracy
    assert reference.ci95 == (cell.paper_pm if cell.pm_kind == "task_ci95" else None)


def test_spec_checks_name_the_cell_and_the_problem(tmp_path):
    wrong = load_table(write_spec(tmp_path / "wrong.yaml", [cell("a", "maml_omniglot_5w1s",
                                                                    requires={"task.ways": 20, "inner.lr": 0.4})]))
    assert missing_pins(wrong.cells[0]) == ["task.ways=5 (spec: 20)"]
    with pytest.raises(TableError, match=r"cell a: preset maml_omniglot_5w1s does not pin .*task.ways=5"):
        check_cells(wrong, wrong.cells, [])
    missing = load_table(write_spec(tmp_path / "missing.yaml", [cell("b", "no_such_preset")]))
    with pytest.raises(TableError, match="cell b: preset 'no_such_preset' does not exist"):
        check_cells(missing, missing.cells, [])
    with pytest.raises(TableError, match=r"requires names \['task.wayz'\]"):
        load_table(write_spec(tmp_path / "key.yaml", [cell("c", "maml_omniglot_5w1s", requires={"task.wayz": 5})]))
    with pytest.raises(TableError, match="paper.pm must be given"):
        load_table(write_spec(tmp_path / "pm.yaml", [cell("d", "maml_omniglot_5w1s", pm=None)]))
    with pytest.raises(TableError, match="distinct names"):
        load_table(write_spec(tmp_path / "dup.yaml", [cell("e", "maml_omniglot_5w1s")] * 2))
    with pytest.raises(TableError, match="cell f: deviations must be a list of sentences"):
        load_table(write_spec(tmp_path / "dev.yaml", [cell("f", "maml_omniglot_5w1s", deviations="no knob")]))
    with pytest.raises(TableError, match="pm_kind"):
        load_table(write_spec(tmp_path / "kind.yaml", [
            {**cell("g", "maml_omniglot_5w1s"), "paper": {"accuracy": 1.0, "pm": 0.1, "pm_kind": "ci"}}]))


def test_protocol_labels_come_from_the_runs_resolved_config():
    def label(*overrides: str) -> str:
        return protocol_status("maml_omniglot_5w1s", load_config(["preset=maml_omniglot_5w1s", *overrides]))["label"]

    assert label("seed=3", "device=cpu", "out_dir=x", "progress=false", "data.root=/r") == "as published"
    assert label("train.iterations=100") == "reduced schedule (100 of 60000 iterations)"
    assert label("train.iterations=100", "inner.lr=0.2") == (
        "deviates: inner.lr=0.2 (preset: 0.4); reduced schedule (100 of 60000 iterations)")
    assert label("train.iterations=70000") == "deviates: train.iterations=70000 (preset: 60000)"
    assert label("reference.accuracy=50.0", "reference.source=x") == "as published"  # what it is shown next to
    assert label("tf32=true") == "deviates: tf32=True (preset: False)"  # TF32 convolutions change the numbers
    graphed = load_config(["preset=maml_omniglot_5w1s"])
    graphed.train.cuda_graph = True  # (validation wants a GPU for it): shown until its GPU equivalence test passes
    assert protocol_status("maml_omniglot_5w1s", graphed)["label"] == (
        "deviates: train.cuda_graph=True (preset: False)")


def test_a_known_deviation_makes_every_run_of_its_cell_deviate():
    cfg = load_config(["preset=maml_omniglot_5w1s"])
    known = ["top-5 ensemble (no such key)"]
    assert protocol_status("maml_omniglot_5w1s", cfg)["label"] == "as published"
    assert protocol_status("maml_omniglot_5w1s", cfg, known)["label"] == (
        "deviates: top-5 ensemble (no such key) (no knob)")
    cfg = load_config(["preset=maml_omniglot_5w1s", "train.iterations=100", "inner.lr=0.2"])
    assert protocol_status("maml_omniglot_5w1s", cfg, known)["label"] == (
        "deviates: top-5 ensemble (no such key) (no knob); inner.lr=0.2 (preset: 0.4); "
        "reduced schedule (100 of 60000 iterations)")


def test_iterations_for_minutes_uses_the_probes_rate_after_its_first_window():
    records = [{"step": 4, "split": "train", "its_per_s": 0.1},  # the auto driver's timing: left out
               {"step": 8, "split": "train", "its_per_s": 2.0}, {"step": 12, "split": "val", "accuracy": 50.0},
               {"step": 12, "split": "train", "its_per_s": 4.0}]
    count, rate = iterations_for_minutes(records, minutes=1, cap=10_000)
    assert rate == pytest.approx(8 / (4 / 2.0 + 4 / 4.0)) and count == round(60 * rate)
    assert iterations_for_minutes(records, minutes=1, cap=100) == (100, rate)  # never more than the preset's
    with pytest.raises(ValueError, match="no timed training window"):
        iterations_for_minutes(records[:1], minutes=1, cap=100)


@pytest.mark.slow  # a CLI run in a subprocess (make test-fast leaves it out)
def test_a_table_naming_a_missing_preset_is_a_one_line_error_and_writes_nothing(tmp_path):
    spec = write_spec(tmp_path / "t.yaml", [cell("a", "maml_omniglot_5w1s"), cell("b", "not_yet_a_preset")])
    proc = run_script("reproduce.py", str(spec), "--out", str(tmp_path / "out"), *TINY)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert "not_yet_a_preset" in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a CLI run in a subprocess (make test-fast leaves it out)
def test_runner_end_to_end_on_synthetic_data_with_a_resume(tmp_path):
    spec = write_spec(tmp_path / "tiny.yaml", [
        cell("maml", "maml_omniglot_5w1s", 98.7, 0.4, requires={"task.ways": 5}),
        cell("fomaml", "fomaml_omniglot_5w1s", 98.3, 0.5, requires={"inner.first_order": True},
             deviations=["a protocol detail no key expresses"]),
    ])
    out = tmp_path / "out"
    args = [str(spec), "--seeds", "2", "--iterations", "4", "--out", str(out), *TINY]
    # an interrupted run: fomaml seed 1 stopped with a checkpoint at step 2 and no results yet
    partial = out / "fomaml" / "seed1"
    first = run_script("train_maml.py", "preset=fomaml_omniglot_5w1s", *TINY, "seed=1", "train.iterations=2",
                       f"out_dir={partial}")
    assert first.returncode == 0, first.stderr
    (partial / "results.json").unlink()

    # first pass: only the maml cell; its two runs start
    proc = run_script("reproduce.py", *args, "--only", "maml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("[start]") == 2 and "fomaml" not in proc.stdout
    runs = {(c, s): out / c / f"seed{s}" for c in ("maml", "fomaml") for s in (0, 1)}
    kept = {k: (runs[k] / "results.json").read_text() for k in (("maml", 0), ("maml", 1))}

    # the whole table: the finished runs are skipped, the interrupted one resumes, the missing one starts
    again = run_script("reproduce.py", *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("[skip]") == 2 and again.stdout.count("[start]") == 1
    assert f"[resume] {partial}" in again.stdout and "resumed from step 2" in again.stdout
    assert {k: (runs[k] / "results.json").read_text() for k in kept} == kept
    records = [json.loads(line) for line in (partial / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]  # went on from 2 to 4
    results = {k: json.loads((d / "results.json").read_text()) for k, d in runs.items()}

    table = json.loads((out / "table.json").read_text())
    assert [r["cell"] for r in table["rows"]] == ["maml", "fomaml"] and table["seeds"] == 2
    markdown = (out / "table.md").read_text()
    for row in table["rows"]:
        accuracies = [results[row["cell"], s]["test"]["accuracy"] for s in (0, 1)]
        ci95s = [results[row["cell"], s]["test"]["ci95"] for s in (0, 1)]
        mean = sum(accuracies) / 2
        assert row["accuracy"] == pytest.approx(mean) and row["seeds_done"] == 2
        assert row["std_over_seeds"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / math.sqrt(2))
        assert row["ci95_mean"] == pytest.approx(sum(ci95s) / 2)
        assert [s["ci95"] for s in row["seeds"]] == pytest.approx(ci95s)
        assert row["within_paper"] == (abs(mean - row["paper"]) <= row["paper_pm"])
        assert row["iterations"] == [4]
        assert row["protocol"].startswith("deviates: ") and "data.dataset=synthetic (preset: omniglot)" in row[
            "protocol"] and row["protocol"].endswith("reduced schedule (4 of 60000 iterations)")
        assert "device" not in row["protocol"] and "progress" not in row["protocol"]  # run control is no deviation
        known = "deviates: a protocol detail no key expresses (no knob); "
        assert row["protocol"].startswith(known) == (row["cell"] == "fomaml")  # the spec's deviations come first
        line = next(x for x in markdown.splitlines() if x.startswith(f"| {row['cell']} |"))
        assert f"{mean:.2f} ± {row['ci95_mean']:.2f}" in line and f"{row['paper']:.2f} ± {row['paper_pm']:.2f}" in line
        assert ("| yes |" if row["within_paper"] else "| no |") in line and "| 2/2 |" in line
    assert (out / "table.png").read_bytes()[:4] == b"\x89PNG"
    assert run_action(runs["maml", 0]) == "skip" and run_action(out / "nothing") == "start"
    (partial / "results.json").unlink()
    assert run_action(partial) == "resume"


# ---- the Results tables of the README and docs/reproducing.md are the runner's output --------------------------

TABLE_FILES = ("README.md", "docs/reproducing.md")  # the files whose marked blocks reproduce.py --readme writes
README_TABLES = [(name, table, command) for name in TABLE_FILES
                 for table, command in re.findall(r"^<!-- reproduce\.py (\S+) -->\nWritten by `python "
                                                  r"scripts/reproduce\.py ([^`]*)`", (REPO / name).read_text(),
                                                  flags=re.M)]


def test_the_readme_results_section_holds_runner_tables():
    assert {table for name, table, _ in README_TABLES if name == "README.md"} >= {"maml_omniglot"}
    assert {table for name, table, _ in README_TABLES if name == "docs/reproducing.md"} >= {
        "maml_omniglot", "fomaml_omniglot"}


@pytest.mark.parametrize(("name", "table", "command"), README_TABLES,
                         ids=[f"{name}:{table}" for name, table, _ in README_TABLES])
def test_each_readme_results_table_is_what_the_runner_writes_from_the_committed_runs(tmp_path, name, table, command):
    # a hand edit of the block, a committed run that changed, or a preset that no longer matches its runs' configs
    # (the protocol column) makes the file differ from the runner's output
    copy = tmp_path / Path(name).name
    copy.write_text((REPO / name).read_text())
    args = command.split()
    assert args[0] == table and "--collect" in args
    proc = run_script("reproduce.py", *args, "--readme", str(copy))
    assert proc.returncode == 0, proc.stderr
    assert copy.read_text() == (REPO / name).read_text()
    block = copy.read_text().split(f"<!-- reproduce.py {table} -->")[1].split(f"<!-- end reproduce.py {table} -->")[0]
    assert "| ours (%) |" in block and any(row.startswith("| ") and " ± " in row for row in block.splitlines()[4:])


def test_readme_blocks_need_their_markers_and_collect_refuses_training_arguments(tmp_path):
    spec = load_table(REPO / "experiments" / "tables" / "maml_omniglot.yaml")
    with pytest.raises(TableError, match="<!-- reproduce.py maml_omniglot -->"):
        replace_block("no markers here\n", spec.name, "rows\n")
    text = replace_block("a\n<!-- reproduce.py maml_omniglot -->\nold\n<!-- end reproduce.py maml_omniglot -->\nb\n",
                         spec.name, "new\n")
    assert text == "a\n<!-- reproduce.py maml_omniglot -->\nnew\n<!-- end reproduce.py maml_omniglot -->\nb\n"
    folder = REPO / "experiments" / "results" / "maml_omniglot_5w5s_cpu1551"
    proc = run_script("reproduce.py", "maml_omniglot", "--collect", str(folder), "--minutes", "5")
    assert proc.returncode != 0 and "--collect trains nothing" in proc.stderr
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    proc = run_script("reproduce.py", "maml_omniglot", "--collect", str(folder), "--readme", str(readme))
    assert proc.returncode != 0 and "<!-- reproduce.py maml_omniglot -->" in proc.stderr.splitlines()[-1]
    assert readme.read_text() == "# no markers\n"  # nothing written


# ---- paper_step: the inner-step column the paper printed (cbfinn/maml test() records steps 0..10) -------------


def test_paper_step_reads_the_runs_step_column_with_the_last_step_beside_it(tmp_path):
    from omegaconf import OmegaConf

    from meta.experiments.tables import aggregate_cell, markdown_table

    spec = load_table(write_spec(tmp_path / "steps.yaml", [cell("s", "maml_omniglot_5w1s", paper_step=3)]))
    assert spec.cells[0].paper_step == 3
    run = tmp_path / "s" / "seed0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(load_config(["preset=maml_omniglot_5w1s"])))
    steps = [{"step": s, "accuracy": 20.0 + 7 * s, "ci95": 1.0 + s / 10, "loss": 1.0} for s in range(11)]
    test = {"accuracy": 90.0, "ci95": 2.0, "loss": 0.3, "tasks": 600, "steps": steps}
    (run / "results.json").write_text(json.dumps({"test": test}))
    row = aggregate_cell(spec.cells[0], [run])
    assert (row["accuracy"], row["ci95_mean"], row["step"]) == (41.0, 1.3, 3)
    assert (row["last_step_accuracy"], row["last_step"]) == (90.0, [10]) and row["protocol"] == "as published"
    assert "41.00 ± 1.30 (step 3; after 10: 90.00 ± 2.00)" in markdown_table(spec, [row], "cmd")
    # a run without the per-step record: ours is the last step's, and the protocol column says so
    (run / "results.json").write_text(json.dumps({"test": {k: v for k, v in test.items() if k != "steps"}}))
    row = aggregate_cell(spec.cells[0], [run])
    assert row["accuracy"] == 90.0 and row["step"] is None and "step 3 not recorded" in row["protocol"]
    for bad in (-1, "3", 11):  # 11: beyond the preset's inner.test_steps=10
        with pytest.raises(TableError, match="paper_step"):
            load_table(write_spec(tmp_path / "bad.yaml", [cell("b", "maml_omniglot_5w1s", paper_step=bad)]))
    maml = load_table(REPO / "experiments/tables/maml_omniglot.yaml").cells
    assert [c.paper_step for c in maml] == [3, 3, 5, 5, 3, 3]  # App. A.1: 3 steps at 5-way, 5 at 20-way


@pytest.mark.slow  # a CLI run in a subprocess, stopped by a signal (make test-fast leaves it out)
def test_ctrl_c_stops_the_runner_with_one_line_and_its_run_resumes(tmp_path):
    """Ctrl-C (or ``timeout -s INT``) reaches the runner and its training run together, as a terminal sends it to
    the whole process group: the run saves its checkpoint, the runner says so in one line (no traceback), and
    the same command continues the run."""
    spec = write_spec(tmp_path / "tiny.yaml", [cell("maml", "maml_omniglot_5w1s", 98.7, 0.4)])
    out = tmp_path / "out"
    args = [str(spec), "--iterations", "100000", "--out", str(out), *TINY]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "reproduce.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "maml" / "seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: every process of the group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith(f"interrupted: {out / 'maml' / 'seed0'} stopped"), stderr
    saved = load_checkpoint(out / "maml" / "seed0" / "checkpoint.pt")["step"]
    assert saved > 0
    again = run_script("reproduce.py", str(spec), "--iterations", str(saved + 2), "--out", str(out), *TINY)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from step {saved}" in again.stdout
