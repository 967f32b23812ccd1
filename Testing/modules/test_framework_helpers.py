"""The framework's pure helpers: what the panel shows (MMRegCommonLib.panel) and the dependency decisions
(MMRegCommonLib.dependencies), without Slicer's GUI."""
from __future__ import annotations

import pytest

import mmreg
from MMRegCommonLib import dependencies as deps
from MMRegCommonLib import panel

ALL_PRESENT = {"torch": "2.13.0+cpu", "monai": "1.6.1", "scipy": "1.16.0", "numpy": "2.3.5", "SimpleITK": "2.5.7",
               "vtk": "9.6.2"}


# ---------------------------------------------------------------------------- panel
def test_method_status_of_the_engine():
    optimize = panel.method_status("optimize")
    assert optimize.available and optimize.reason == "" and optimize.models == []
    assert optimize.supports_diffeomorphic and not optimize.supports_refinement
    missing = panel.method_status("mi" if "mi" not in mmreg.method_names() else "no-such-method")
    assert not missing.available and not missing.engine_missing
    assert "is not available in this version" in missing.reason and "optimize" in missing.reason


def test_model_choices_from_the_engine_listing():
    assert panel.model_choice("brain-t1t2") == panel.ModelChoice("brain-t1t2", "brain-t1t2")
    tuned = panel.model_choice({"name": "mine", "source": "fine-tuned", "description": "my 12 CTs"})
    assert (tuned.value, tuned.label, tuned.tooltip) == ("mine", "mine (fine-tuned)", "my 12 CTs")
    assert panel.model_choice({"id": "x", "label": "Brain (shipped)"}).label == "Brain (shipped)"
    with_models = panel.MethodStatus("net", True, models=[tuned])
    assert [v for v, _, _ in panel.model_items(with_models)] == ["", "mine"]  # "" = the method's default
    assert panel.model_items(panel.method_status("optimize")) == [("", "No trained model needed", "")]


def test_diffeomorphic_checkbox_is_the_users_or_the_models():
    optimize = panel.method_status("optimize")  # default True: the user's choice
    assert panel.diffeomorphic_control(optimize)[:2] == (True, None)
    velocity = panel.model_choice({"name": "default", "diffeomorphic": True})
    plain = panel.model_choice({"name": "plain", "source": "user", "diffeomorphic": False})
    learned = panel.MethodStatus("net", True, models=[velocity, plain],
                                 options={"refinement_steps": 0, "diffeomorphic": None})
    assert learned.model_sets_diffeomorphic and not learned.supports_diffeomorphic
    enabled, checked, tip = panel.diffeomorphic_control(learned)  # "" = default model
    assert (enabled, checked) == (False, True) and "'default' predicts a stationary velocity" in tip
    enabled, checked, tip = panel.diffeomorphic_control(learned, "plain")
    assert (enabled, checked) == (False, False) and "displacement" in tip
    assert panel.default_model(panel.MethodStatus("net", True, models=[plain])) is plain
    assert panel.default_model(panel.MethodStatus("net", True, models=[plain, panel.ModelChoice("b", "b")])) is None
    assert panel.diffeomorphic_control(panel.MethodStatus("x", True))[:2] == (False, None)


def test_device_choices_say_what_auto_picks():
    choices = panel.device_choices()
    values = [value for value, _ in choices]
    assert values[:2] == ["auto", "cpu"]
    import torch
    if not torch.cuda.is_available():
        assert "CPU" in choices[0][1] and "no GPU" in choices[0][1]
    for value in values:
        mmreg.device.choose_device(value)  # every offered value is accepted by the engine


def test_engine_options_follow_the_method():
    optimize = panel.method_status("optimize")
    assert panel.engine_options(optimize) == {}
    assert panel.engine_options(optimize, diffeomorphic=False) == {"diffeomorphic": False}
    with pytest.raises(mmreg.InputError, match="no option 'refinement_steps'"):
        panel.engine_options(optimize, refinement_steps=10)
    network = panel.MethodStatus("net", True, options={"refinement_steps": 0, "diffeomorphic": True})
    assert panel.engine_options(network, 25, True) == {"refinement_steps": 25, "diffeomorphic": True}


class _Node:
    def __init__(self, node_id):
        self.node_id = node_id

    def GetID(self):
        return self.node_id


def test_apply_state_and_its_reasons():
    ok = panel.MethodStatus("optimize", True)
    a, b = _Node("a"), _Node("b")
    assert panel.apply_state(ok, a, b)[0] is True
    assert panel.apply_state(ok, None, b) == (False, "Select the fixed volume (the image that stays in place).")
    assert "moving volume" in panel.apply_state(ok, a, None)[1]
    assert "two different volumes" in panel.apply_state(ok, a, _Node("a"))[1]
    assert "running" in panel.apply_state(ok, a, b, running=True)[1]
    gone = panel.MethodStatus("mi", False, "Method 'mi' is not available in this version.")
    assert panel.apply_state(gone, a, b) == (False, gone.reason)
    # Engine not importable yet (torch missing): Apply stays possible, it offers the installation.
    assert panel.apply_state(panel.MethodStatus("mi", False, "x", engine_missing=True), a, b)[0] is True


def test_user_messages_are_readable():
    assert panel.user_message(mmreg.InputError("The fixed image is empty.")) == "The fixed image is empty."
    text = panel.user_message(KeyError("spacing"))
    assert text.startswith("Unexpected error (KeyError: 'spacing')") and "Traceback" not in text


def test_progress_stage_drops_step_counters():
    assert panel.progress_stage("instance optimisation, level 1/2: step 3/40") == "instance optimisation"
    assert panel.progress_stage("affine: level 2/3, step 5/100") == "affine"
    assert panel.progress_stage("warping") == "warping"


def test_summary_of_a_report():
    report = {"device": "cpu", "timings_s": {"total": 12.5, "method": 9.0},
              "quality": {"deformable": {"folding_percent": 0.012},
                          "labels": {"labels": [1, 2, 3], "dice": {"1": 0.9, "2": 0.8, "3": 0.1}, "mean_dice": 0.6},
                          "labels_after_affine": {"labels": [1, 2, 3], "dice": {"1": 0.7, "2": 0.6, "3": 0.1}}}}
    summary = panel.summarize(report, {1: "Liver", 2: "Spleen", 3: "Kidney"}, scored=[1, 2])
    assert summary["dice"] == [("Liver", 0.7, 0.9), ("Spleen", 0.6, 0.8)]
    assert summary["mean_dice"] == pytest.approx(0.85) and summary["mean_dice_affine"] == pytest.approx(0.65)
    html = panel.format_summary(summary)
    assert "12.5 s" in html and "0.012 %" in html and "Liver" in html and "Kidney" not in html
    bare = panel.summarize({"timings_s": {"total": 3.0}, "quality": {}})
    assert bare["dice"] == [] and "select a moving and a fixed segmentation" in panel.format_summary(bare)


# ---------------------------------------------------------------------------- dependencies
def test_nothing_to_do_when_everything_is_there():
    assert deps.plan_dependencies(ALL_PRESENT).satisfied


def test_missing_or_old_pip_packages_are_installed_torch_via_the_extension():
    plan = deps.plan_dependencies(dict(ALL_PRESENT, monai=None, scipy="1.5.2", torch=None))
    assert plan.pip == ["monai>=1.4", "scipy>=1.10"]
    assert plan.torch == "PyTorch is missing" and not plan.refused
    old_torch = deps.plan_dependencies(dict(ALL_PRESENT, torch="2.1.2+cu118"))
    assert old_torch.torch.startswith("PyTorch 2.1.2+cu118 is older") and old_torch.pip == []


def test_slicer_packages_are_never_installed_or_upgraded():
    plan = deps.plan_dependencies(dict(ALL_PRESENT, numpy="1.21.0", SimpleITK=None, vtk=None))
    assert plan.pip == [] and plan.torch is None
    assert len(plan.refused) == 3 and all("never installs or replaces" in r for r in plan.refused)
    # Even a requirement wrongly declared as "pip" is refused when it is one of Slicer's own packages.
    wrong = (deps.Requirement("numpy", "numpy", "3.0", "pip"),)
    plan = deps.plan_dependencies({"numpy": "2.3.5"}, wrong)
    assert plan.pip == [] and plan.refused
    # Importable without version metadata (a Slicer build's VTK): accepted as it is.
    assert deps.plan_dependencies(dict(ALL_PRESENT, vtk="")).satisfied


def test_ensure_asks_first_and_installs_without_dependencies():
    asked, installed = [], []
    ok, message = deps.ensure_dependencies(confirm=lambda text: asked.append(text) or False,
                                           pip_install=installed.append, installed=dict(ALL_PRESENT, monai=None))
    assert not ok and "not installed" in message and installed == [] and "monai>=1.4" in asked[0]
    ok, message = deps.ensure_dependencies(confirm=lambda text: True, pip_install=installed.append,
                                           installed=dict(ALL_PRESENT, monai=None))
    assert ok and installed == [["monai>=1.4", "--no-deps"]]


def test_ensure_refuses_without_asking_and_needs_the_pytorch_extension():
    asked = []
    ok, message = deps.ensure_dependencies(confirm=lambda text: asked.append(text) or True, pip_install=None,
                                           installed=dict(ALL_PRESENT, numpy="1.19.0"))
    assert not ok and asked == [] and "numpy" in message
    ok, message = deps.ensure_dependencies(confirm=lambda text: True, pip_install=lambda args: None,
                                           installed=dict(ALL_PRESENT, torch=None))
    assert not ok and "install the 'PyTorch' extension" in message  # no PyTorchUtils outside Slicer


def test_installed_versions_of_this_environment():
    found = deps.installed_versions()
    assert found["numpy"] and found["torch"] and found["monai"]
    assert deps.plan_dependencies(found).satisfied


def test_symmetric_checkbox_needs_a_velocity_model():
    velocity = panel.model_choice({"name": "default", "diffeomorphic": True})
    plain = panel.model_choice({"name": "plain", "source": "user", "diffeomorphic": False})
    learned = panel.MethodStatus("net", True, models=[velocity, plain],
                                 options={"refinement_steps": 0, "diffeomorphic": None, "symmetric": False})
    enabled, tip = panel.symmetric_control(learned)  # "" = the default model, a velocity model
    assert enabled and "both orders of the pair" in tip
    enabled, tip = panel.symmetric_control(learned, "plain")
    assert not enabled and "'plain' predicts a displacement field" in tip
    assert panel.symmetric_control(learned, "/some/model/folder")[0]  # not listed: the engine checks its card
    optimize = panel.method_status("optimize")
    assert not optimize.supports_symmetric and not panel.symmetric_control(optimize)[0]
    assert panel.shared_control_visibility(learned)["symmetric"]
    assert not panel.shared_control_visibility(optimize)["symmetric"]
    assert panel.engine_options(learned, symmetric=True) == {"symmetric": True}
    with pytest.raises(mmreg.InputError, match="has no option 'symmetric'"):
        panel.engine_options(optimize, symmetric=True)
