"""The RegistrationTraining module headless: its self-test (a tiny real training, stopped, resumed and
used by MIRegistration), its Logic, and its pure parts (progress, command line, panel state).

Every test that can start the engine gets temporary user-model and cache folders
(``MMREG_MODELS``, ``MMREG_CACHE``): nothing is written into the real ``~/.mmreg``. The
process mechanics (polling, stop, exit codes, error messages) are also checked with a stand-in
child process that writes the engine's progress file format, which takes a fraction of a second
instead of starting torch.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import mmreg

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def module():
    return importlib.import_module("RegistrationTraining")


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """Temporary user model and cache folders for the engine (and the processes it starts)."""
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("MMREG_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def lib():
    from RegistrationTrainingLib import panelstate, progress, runner
    return SimpleNamespace(panelstate=panelstate, progress=progress, runner=runner)


# ---------------------------------------------------------------------------- the self-test
def test_self_test_runs_headless(module, scene, folders):
    """The class Slicer's Self Tests run: bad input, pairs round trip, tiny training stopped/resumed/used."""
    before = dict(os.environ)
    module.RegistrationTrainingTest().runTest()
    assert os.environ.get("MMREG_MODELS") == before.get("MMREG_MODELS")  # the test restored the environment
    assert not (folders / "models").exists()  # it used its own temporary folders, not even ours


def test_module_description(module):
    parent = SimpleNamespace()
    module.RegistrationTraining(parent)
    assert parent.title == "Registration Training"
    assert parent.categories == ["Registration.Learning-based"]
    assert "mmreg train --method mi --data manifest.csv" in parent.helpText
    assert "Resume" in parent.helpText and "$MMREG_MODELS" in parent.helpText


# ---------------------------------------------------------------------------- progress
def _events(*rows):
    return [dict(zip(("event",) + tuple(keys), (kind,) + tuple(values)))
            for kind, keys, values in ((r[0], r[1::2], r[2::2]) for r in rows)]


def test_progress_folds_the_engine_events(lib):
    p = lib.progress.TrainingProgress()
    assert p.state == "starting" and p.fraction == 0.0 and "Starting" in p.status_text()
    p.update([{"event": "start", "steps": 10, "start_step": 0, "pairs": {"training": 4, "validation": 1},
               "skipped": [{"entry": "row 3", "reason": "unreadable"}]},
              {"event": "validation", "step": 0, "mean_dice": 0.61, "mean_loss": -0.2, "best_step": None}]
             + [{"event": "step", "step": k, "steps": 10, "loss": -0.1 * k, "seconds_per_step": 2.0,
                 "eta_s": 2.0 * (10 - k)} for k in (1, 2, 3)])
    assert (p.state, p.step, p.steps, p.fraction) == ("running", 3, 10, 0.3)
    assert p.loss_steps == [1, 2, 3] and p.losses == pytest.approx([-0.1, -0.2, -0.3])
    assert p.pairs == {"training": 4, "validation": 1} and p.skipped[0]["entry"] == "row 3"
    assert p.status_text() == "Step 3/10 · loss -0.3 · Dice 0.610 · 2 s/step · 14 s left"
    p.update([{"event": "stopped", "step": 3, "checkpoint": "/x/last.pt", "model_dir": "/x"}])
    assert p.state == "stopped" and p.model_dir == "/x" and "Resume" in p.status_text()

    # A crash after step 5 with the last checkpoint at step 3: the resumed run redoes 4 and 5, once each.
    p.update([{"event": "start", "steps": 10, "start_step": 3}] +
             [{"event": "step", "step": k, "steps": 10, "loss": -1.0 * k} for k in (4, 5)] +
             [{"event": "start", "steps": 10, "start_step": 3}] +
             [{"event": "step", "step": k, "steps": 10, "loss": -2.0 * k} for k in range(4, 11)] +
             [{"event": "validation", "step": 10, "mean_dice": 0.7, "mean_loss": -0.3, "best_step": 10},
              {"event": "done", "step": 10, "model_dir": "/x", "wall_s": 125.0}])
    assert p.loss_steps == list(range(1, 11))
    assert p.losses[3:] == pytest.approx([-2.0 * k for k in range(4, 11)])
    assert [row[0] for row in p.validation] == [0, 10]
    assert (p.state, p.fraction, p.best_step, p.best_dice, p.last_dice) == ("done", 1.0, 10, 0.7, 0.7)
    assert p.status_text().endswith("done in 2 min")

    # A fresh run of the same name (start_step 0) forgets everything before it; errors carry the message.
    p.update([{"event": "start", "steps": 5, "start_step": 0}, {"event": "error", "message": "out of memory"}])
    assert p.losses == [] and p.validation == [] and p.best_step is None
    assert p.state == "error" and p.status_text() == "Failed: out of memory"
    p.update([{"event": "something new"}, "not an event"])  # ignored


def test_durations_are_short_and_readable(lib):
    f = lib.progress.format_duration
    assert [f(v) for v in (0, 44.6, 60, 59 * 60, 3600, 7530, None, float("nan"), -1)] == \
        ["0 s", "45 s", "1 min", "59 min", "1 h 00 min", "2 h 06 min", "?", "?", "?"]


# ---------------------------------------------------------------------------- command line
def test_choices_become_the_engine_options(lib):
    Choices = lib.runner.TrainingChoices
    choices = Choices(base_model="mi_brain", iterations=300, learning_rate=5e-5, batch_size=2, spacing=3.0,
                      augment=False, smoothness=0.5, validation_fraction=0.25, device="cuda:1", threads=4)
    assert choices.problems() == []
    command = lib.runner.train_command("mi", "/d/m.csv", "liver", choices, output="/o", resume=True, python="py")
    assert command == ["py", "-m", "mmreg", "train", "--method", "mi", "--data", "/d/m.csv", "--name", "liver",
                       "--output", "/o", "--base-model", "mi_brain", "--iterations", "300", "--learning-rate", "5e-05",
                       "--batch-size", "2", "--spacing", "3.0", "--smoothness", "0.5", "--validation-fraction", "0.25",
                       "--threads", "4", "--no-augment", "--device", "cuda:1", "--resume", "--quiet"]
    # None keeps the engine's default; the command parses with the engine's own parser.
    default = lib.runner.train_command("mi", "m.csv", "n", Choices(), python="py")
    assert default == ["py", "-m", "mmreg", "train", "--method", "mi", "--data", "m.csv", "--name", "n", "--device",
                       "auto", "--quiet"]
    from mmreg.cli import build_parser
    args = build_parser().parse_args(command[3:])
    assert (args.method, args.steps, args.learning_rate, args.spacing, args.no_augment, args.resume) == \
        ("mi", 300, 5e-5, 3.0, True, True)

    bad = Choices(iterations=0, learning_rate=-1.0, batch_size=True, spacing=float("nan"), smoothness=-0.1,
                  validation_fraction=0.95, device="tpu", threads=0)
    problems = " ".join(bad.problems())
    for text in ("iterations must be", "learning rate must be", "batch size must be", "spacing must be",
                 "smoothness must be", "validation fraction must be between 0 and 0.9", "device must be one of",
                 "threads must be"):
        assert text in problems
    with pytest.raises(mmreg.InputError, match="Unknown training choice.*epochs"):
        Choices.from_keywords(epochs=3)


def test_python_executable_finds_pythonslicer_inside_slicer(lib, tmp_path):
    find = lib.runner.python_executable
    assert find("/usr/bin/python3.12") == "/usr/bin/python3.12"
    assert find("/opt/Slicer/bin/PythonSlicer") == "/opt/Slicer/bin/PythonSlicer"
    app = tmp_path / "Slicer" / "bin"
    app.mkdir(parents=True)
    (app / "PythonSlicer").write_text("")
    assert find(str(app / "SlicerApp-real")) == str(app / "PythonSlicer")      # the application
    assert find(str(app / "python-real")) == str(app / "PythonSlicer")         # the bare interpreter
    elsewhere = str(tmp_path / "other" / "SlicerApp-real")
    assert find(elsewhere, which=lambda name: "/path/PythonSlicer") == "/path/PythonSlicer"
    assert find(elsewhere, which=lambda name: None) == elsewhere


def test_child_environment_puts_the_engine_first(lib):
    engine_root = str(Path(mmreg.__file__).resolve().parents[1])
    env = lib.runner.child_environment({"PYTHONPATH": os.pathsep.join(["/a", engine_root]), "X": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [engine_root, "/a"] and env["X"] == "1"
    assert lib.runner.child_environment({})["PYTHONPATH"] == engine_root


# ---------------------------------------------------------------------------- the process, with a stand-in child
FAKE_ENGINE = textwrap.dedent("""
    import json, os, sys, time
    out, mode = sys.argv[1], sys.argv[2]
    folder = os.path.join(out, "training")
    os.makedirs(folder, exist_ok=True)
    def event(**e):
        with open(os.path.join(folder, "progress.jsonl"), "a") as f:
            f.write(json.dumps(e) + "\\n")
    if mode == "bad":
        print("loading...", flush=True)
        print("mmreg: error: No usable pair in the manifest 'm.csv' (2 skipped).", file=sys.stderr)
        sys.exit(2)
    event(event="start", steps=50, start_step=0, pairs={"training": 2, "validation": 1}, skipped=[])
    for step in range(1, 51):
        time.sleep(0.02)
        event(event="step", step=step, steps=50, loss=1.0 / step, seconds_per_step=0.02, eta_s=0.02 * (50 - step))
        if os.path.exists(os.path.join(folder, "STOP")):
            open(os.path.join(folder, "last.pt"), "w").close()
            event(event="stopped", step=step, checkpoint="last.pt", model_dir=out)
            sys.exit(130)
    event(event="done", step=50, model_dir=out, wall_s=1.0)
""")


def _fake_run(lib, tmp_path, mode, name="fake", offset=0):
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    out = tmp_path / "out" / name
    return lib.runner.TrainingRun([sys.executable, str(script), str(out), mode], "mi", name, out,
                                  tmp_path / "work" / "console.txt", initial_offset=offset)


def test_run_polls_stops_and_reports_exit_codes(lib, tmp_path):
    run = _fake_run(lib, tmp_path, "train")
    batches = []

    def stop_at_step_5(events):
        batches.append(events)
        if run.progress.step >= 5:
            run.stop()

    assert run.wait(timeout=30, interval=0.01, on_events=stop_at_step_5) == 130
    assert not run.running and run.progress.state == "stopped"
    assert 5 <= run.progress.step < 50 and run.progress.loss_steps == list(range(1, run.progress.step + 1))
    assert run.error_message() == "" and (run.output_dir / "training" / "STOP").exists()
    assert sum(len(b) for b in batches) == run.progress.events

    done = _fake_run(lib, tmp_path, "train", name="finished")
    assert done.wait(timeout=30, interval=0.05) == 0
    assert done.progress.state == "done" and done.progress.step == 50 and done.progress.fraction == 1.0
    assert done.poll() == []  # nothing new after the end


def test_bad_input_exit_gives_the_engines_message(lib, tmp_path):
    run = _fake_run(lib, tmp_path, "bad")
    assert run.wait(timeout=30, interval=0.05) == 2
    assert run.progress.state == "error"
    assert run.error_message() == "No usable pair in the manifest 'm.csv' (2 skipped)."
    assert run.progress.message == run.error_message()
    assert "loading..." in run.console_text()


def test_old_events_of_an_abandoned_run_are_skipped(lib, tmp_path):
    stale = tmp_path / "out" / "fake" / "training" / "progress.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"event": "error", "message": "an old failure"}) + "\n")
    run = _fake_run(lib, tmp_path, "train", offset=stale.stat().st_size)
    assert run.wait(timeout=30, interval=0.05) == 0
    assert run.progress.state == "done" and run.progress.message == ""


# ---------------------------------------------------------------------------- panel state
def test_panel_state_says_what_is_missing(lib):
    ps = lib.panelstate
    ready = dict(engine_missing=False, methods=["mi"], method="mi", source="scene", manifest_path="", pair_count=2,
                 name="liver", existing_names=["mi_brain"], resumable=False, running=False)
    assert ps.start_state(**ready) == (True, "Ready: Start trains 'liver' in a separate process; Slicer stays usable.")
    cases = [({"running": True}, "A training runs"),
             ({"method": "optimize"}, "Choose a trainable method (mi)"),
             ({"pair_count": 0}, "Add at least one pair"),
             ({"source": "manifest"}, "Choose the manifest file"),
             ({"name": "  "}, "Enter a name"),
             ({"name": "a/b"}, "not usable as a folder name"),
             ({"name": "mi_brain"}, "already exists for method 'mi'"),
             ({"resumable": True}, "Resume continues it")]
    for change, text in cases:
        enabled, reason = ps.start_state(**dict(ready, **change))
        assert not enabled and text in reason, (change, reason)
    assert ps.start_state(**dict(ready, source="manifest", manifest_path="/d/m.csv"))[0]
    assert ps.start_state(**dict(ready, engine_missing=True, methods=[]))[0]  # Start installs the engine first
    assert ps.resume_state(resumable=True, running=False, name="liver")[0]
    assert not ps.resume_state(resumable=False, running=False, name="liver")[0]
    assert not ps.resume_state(resumable=True, running=True, name="liver")[0]
    assert [ps.name_problem(n) is None for n in ("liver_ct-mr.v2", "a" * 64, "a" * 65, ".hidden", "x y", "")] == \
        [True, True, False, False, False, False]


def test_pairs_hint_for_aligned_pair_methods(lib):
    """The learned metric trains on aligned pairs of two modalities, not on pairs to register: the data note and
    Start's reason say so when it is the chosen method."""
    ps = lib.panelstate
    assert "metric" in ps.ALIGNED_PAIR_METHODS and "mi" not in ps.ALIGNED_PAIR_METHODS
    hint = ps.pairs_hint("metric")
    assert "ALIGNED pairs" in hint and "same subject" in hint and "no labels are needed" in hint
    assert ps.pairs_hint("mi").startswith("Pairs to register") and "aligned" not in ps.pairs_hint("mi").lower()
    assert ps.pairs_hint("") == ps.pairs_hint("mi")
    ready = dict(engine_missing=False, methods=["mi", "metric"], source="scene", manifest_path="", pair_count=0,
                 name="t1t2", existing_names=[], resumable=False, running=False)
    assert ps.start_state(method="metric", **ready)[1].startswith("Add at least one aligned pair (fixed = modality A")
    assert ps.start_state(method="mi", **ready)[1] == "Add at least one pair (fixed and moving volume) with 'Add pair'."


def test_base_model_choices(lib):
    ps = lib.panelstate
    models = [{"name": "mi_brain", "source": "shipped", "description": "T1 brain"},
              {"name": "liver", "source": "user", "description": ""}]
    items = ps.base_model_items(models, "mi_brain")
    assert [(v, label) for v, label, _ in items] == [("", "Default model: mi_brain"), ("-", "None: train from scratch"),
                                                     ("mi_brain", "mi_brain"), ("liver", "liver (fine-tuned)")]
    assert [v for v, _, _ in ps.base_model_items(models, None)][0] == "-"
    assert (ps.base_model_value("", "mi_brain"), ps.base_model_value("", None), ps.base_model_value("-", "mi_brain"),
            ps.base_model_value("liver", "mi_brain")) == ("mi_brain", None, None, "liver")
    assert [v for v, _, _ in ps.method_items(["mi"])] == ["mi"] and ps.method_items([])[0][0] == ""


# ---------------------------------------------------------------------------- Logic without a training process
def test_default_base_model_is_the_methods_default(module, folders):
    # four shipped mi models (mi_brain, mi_brain_3mm, mi_brain_mind, mi_brain_mind_distilled): the training panel's
    # default base model is the one `mmreg register --method mi` uses without --model, not "ambiguous"
    logic = module.RegistrationTrainingLogic
    shipped = {m["name"] for m in logic.list_models("mi") if m["source"] == "shipped"}
    assert {"mi_brain", "mi_brain_3mm", "mi_brain_mind", "mi_brain_mind_distilled"} <= shipped
    assert logic.default_model("mi") == "mi_brain_3mm" == mmreg.methods.get_method("mi").chosen_model({})
    assert logic.default_model("optimize") is None  # no models at all


def test_logic_refuses_bad_input_without_starting(module, scene, folders):
    from MMRegCommonLib.testing import make_phantom_nodes
    logic = module.RegistrationTrainingLogic()
    fixed, fixed_seg, _ = make_phantom_nodes(scene, "F")
    moving, _, _ = make_phantom_nodes(scene, "M", shift=(3.0, 0.0, 0.0))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "L")
    pair = module.ScenePair(fixed, moving, fixed_seg)
    with pytest.raises(mmreg.InputError, match="must be a scalar volume, not a vtkMRMLLabelMapVolumeNode"):
        logic.check_scene_pairs([module.ScenePair(fixed, labelmap)])
    with pytest.raises(mmreg.InputError, match="Pair 2: select the moving volume"):
        logic.check_scene_pairs([pair, module.ScenePair(fixed, None)])
    with pytest.raises(mmreg.InputError, match="modality must be auto, MR or CT"):
        logic.check_scene_pairs([module.ScenePair(fixed, moving, moving_modality="PET")])
    with pytest.raises(mmreg.InputError, match="Base model 'nope' is not a model of method 'mi'.*mi_brain"):
        logic.start_from_scene("mi", [pair], "x", base_model="nope")
    with pytest.raises(mmreg.InputError, match="shipped model named 'mi_brain' already exists"):
        logic.start_from_scene("mi", [pair], "mi_brain")
    with pytest.raises(mmreg.InputError, match="Choose the manifest file"):
        logic.start("mi", "", "x")
    empty = folders / "empty.csv"
    empty.write_text("fixed,moving\n")
    with pytest.raises(mmreg.InputError, match="lists no pairs"):
        logic.start("mi", empty, "x")
    assert logic.run is None and not (folders / "models" / "mi").exists()


def test_logic_reports_what_the_engine_refuses(module, scene, folders):
    """A real ``mmreg train`` process that refuses its data: exit code 2 and the engine's sentence."""
    bad = folders / "data"
    bad.mkdir()
    for name in ("f.nii.gz", "m.nii.gz"):
        (bad / name).write_text("not an image")
    from mmreg.manifest import write_manifest
    manifest = write_manifest(bad / "pairs.csv", [{"fixed": str(bad / "f.nii.gz"),
                                                   "moving": str(bad / "m.nii.gz")}])
    logic = module.RegistrationTrainingLogic()
    run = logic.start("mi", manifest, "refused", iterations=2, threads=1, device="cpu")
    assert logic.is_running
    assert run.wait(timeout=120, interval=0.1) == 2, run.console_text()
    assert not logic.is_running
    assert "No usable pair in the manifest" in run.error_message() and "row 1" in run.error_message()
    assert run.progress.state == "error"
    assert run.command[1:4] == ["-m", "mmreg", "train"] and "--quiet" in run.command
    assert str(folders / "models") in str(run.console_path)  # the work folder is in the user model folder


def test_curves_follow_the_progress(module, scene, folders, lib):
    logic = module.RegistrationTrainingLogic()
    run = SimpleNamespace(method="mi", name="curvy", output_dir=folders / "models" / "mi" / "curvy",
                          progress=lib.progress.TrainingProgress())
    run.poll = lambda: []
    logic.poll(run)  # the nodes exist from the first poll on, empty
    nodes = logic.curve_nodes(run)
    assert nodes["loss_table"].GetNumberOfRows() == 0 and nodes["dice_chart"].GetNumberOfPlotSeriesNodes() == 1
    run.progress.update([{"event": "start", "steps": 4, "start_step": 0},
                         {"event": "validation", "step": 0, "mean_dice": None, "mean_loss": -0.1}]
                        + [{"event": "step", "step": k, "steps": 4, "loss": -0.1 * k} for k in range(1, 5)]
                        + [{"event": "validation", "step": 4, "mean_dice": 0.8, "mean_loss": -0.4}])
    again = logic.update_curves(run)
    assert {k: n.GetID() for k, n in again.items()} == {k: n.GetID() for k, n in nodes.items()}  # same nodes
    from slicer.util import arrayFromTableColumn
    np.testing.assert_allclose(arrayFromTableColumn(nodes["loss_table"], "loss"), [-0.1, -0.2, -0.3, -0.4])
    np.testing.assert_allclose(arrayFromTableColumn(nodes["loss_table"], "step"), [1, 2, 3, 4])
    dice = arrayFromTableColumn(nodes["validation_table"], "mean Dice")
    assert math.isnan(dice[0]) and dice[1] == pytest.approx(0.8)
    series = nodes["loss_series"]
    assert (series.GetXColumnName(), series.GetYColumnName()) == ("step", "loss")
    assert series.GetTableNodeID() == nodes["loss_table"].GetID()
    # Deleted by the user (or a closed scene): made again on the next update.
    scene.RemoveNode(nodes["loss_chart"])
    remade = logic.update_curves(run)
    assert remade["loss_chart"].GetScene() is scene and remade["loss_table"].GetNumberOfRows() == 4
