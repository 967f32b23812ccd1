"""The GradRegistration module headless: its Slicer self-test, its options (model selector with each GradNet's variant
and modality pair, default model, refinement similarity, gate-map controls), and its Logic directly: the known
displacement of a constant-field model in the transform node, the gate volumes, models without gates, cancel, bad
input and the parameter node.

The Logic tests use CONSTANT-FIELD GradNets written to a temporary model folder as if shipped (the module's own
:func:`GradRegistration.save_constant_model`, as ``Testing/engine/test_grad.py`` builds them): the last convolution
of each branch has zero weights and a bias, so the image branch predicts :data:`SHIFT_VOXELS` everywhere and the
gradient branch 0, whatever the images; the gate biases fix the gates (image gate sigmoid(30) ~ 1, gradient gate
sigmoid(-30) ~ 0 or sigmoid(0) = 0.5). The numbers below are therefore exact and do not depend on training: the
fused field is :data:`SHIFT_VOXELS` voxels of the 4 mm network grid, whose axes are the fixed image's (oblique here),
i.e. ``D @ (4 mm * shift in x, y, z)`` in LPS, and half of it for the average fusion.

The self-test runs with the installed shipped models (none of ``grad`` when this was written: its registration
checks then run the engine's ``optimize`` and its model checks say they are skipped) and its own constant-field
test models; the user's model folder is replaced by an empty one so that models being trained on this machine do
not change it.
"""
from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

import mmreg
from MMRegCommonLib.testing import node_ids, oblique_volume

HAS_GRAD = "grad" in mmreg.method_names()
needs_grad = pytest.mark.skipif(not HAS_GRAD, reason="the engine has no 'grad' method")
#: The image branch's constant field of the test models, voxels of the network grid, tensor order (z, y, x).
SHIFT_VOXELS = (0.5, -1.0, 1.5)
#: The test models: name -> (variant, gradient gate bias, description). Named like the shipped ones.
TEST_MODELS = {
    "grad_mr_gated": ("gated", -30.0, "Constant-field test model, gated fusion, MR-MR."),
    "grad_ctmr_gated": ("gated", 0.0, "Constant-field test model, gated fusion, CT-MR."),
    "grad_mr_average": ("average", 0.0, "Constant-field test model, average fusion."),
    "grad_mr_vm": ("vm", 0.0, "Constant-field test model, VM baseline."),
    "grad_mr_vmconcat": ("vm_concat", 0.0, "Constant-field test model, VM(concat) baseline."),
}
F = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Two cores and training jobs beside the tests: the engine runs one thread (``MMREG_THREADS``; with the default,
    all cores, the shared phantom registration took 45 s instead of 3.6 s here)."""
    import torch
    before = torch.get_num_threads()
    monkeypatch.setenv("MMREG_THREADS", "1")
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def constant_models(tmp_path_factory):
    """A model folder with the constant-field GradNets of :data:`TEST_MODELS`."""
    gr = importlib.import_module("GradRegistration")
    root = tmp_path_factory.mktemp("grad-models")
    for name, (variant, gradient_bias, description) in TEST_MODELS.items():
        gr.save_constant_model(root / "grad" / name, SHIFT_VOXELS, variant, gradient_bias, description)
    return root


@pytest.fixture
def models(constant_models, tmp_path, monkeypatch):
    """Only the constant-field models are installed, as shipped ones; no user model."""
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(constant_models))
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "no user models"))
    return constant_models


@pytest.fixture
def module():
    return importlib.import_module("GradRegistration")


@pytest.fixture
def options():
    return importlib.import_module("GradRegistrationLib.options")


def arrays(node):
    import slicer
    return slicer.util.arrayFromVolume(node)


def status_with(models=(), available=True):
    """A method status like the engine's for 'grad' with the given listing entries."""
    from MMRegCommonLib import panel
    opts = {"model": None, "refinement_steps": 0, "refine_similarity": "mind", "diffeomorphic": None,
            "max_voxels": 4_000_000, "refinement_max_voxels": 2_000_000}
    return panel.MethodStatus("grad", available, "" if available else "Method 'grad' has no trained model yet.",
                              models=[panel.model_choice(m) for m in models], options=opts)


def expected_displacement_lps(image, fraction=1.0) -> np.ndarray:
    """The constant field of the test models in LPS mm on ``image``'s network grid (its direction, 4 mm voxels)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return fraction * direction @ (4.0 * np.array(SHIFT_VOXELS[::-1]))


# ---------------------------------------------------------------------------- the self-test
@needs_grad
def test_self_test_runs_headless(module, scene, tmp_path, monkeypatch):
    """The same test class Slicer's Self Tests run (all its checks, via runTest), with the installed shipped models and
    no user model; its constant-field checks report exact numbers (transform within 0.05 mm of the known shift)."""
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "no user models"))
    messages = []
    test = module.GradRegistrationTest()
    test.delayDisplay = messages.append
    test.runTest()
    assert any(m.startswith("Known-shift model: fixed points mapped within 0.0000 mm") for m in messages), messages
    assert any("so no gate volumes were made" in m for m in messages), messages


@needs_grad
def test_self_test_model_checks_with_shipped_models(module, models, scene):
    """The self-test's shipped-model check (skipped above while no grad model is shipped) on the five constant-field
    models installed as shipped: each listed with its variant and modality, run by name, gate maps exactly for the
    gated ones."""
    messages = []
    test = module.GradRegistrationTest()
    test.delayDisplay = messages.append
    test.setUp()
    test.test_Models()
    (line,) = messages
    for label in ("grad_mr_gated (gated fusion, MR-MR) — default", "grad_ctmr_gated (gated fusion, CT-MR)",
                  "grad_mr_average (average fusion, MR-MR)", "grad_mr_vm (VM, MR-MR)",
                  "grad_mr_vmconcat (VM(concat), MR-MR)"):
        assert label + ": phantom Dice" in line, line
    assert "gradient gate mean 0.000" in line and "gradient gate mean 0.500" in line, line


def test_module_description(module):
    parent = SimpleNamespace()
    module.GradRegistration(parent)
    assert parent.title == "Gradient-map Registration (dual branch)"
    assert parent.categories == ["Registration.Learning-based"]
    assert "--method grad" in parent.helpText and "gradient gate" in parent.helpText
    assert "Gate maps" in parent.helpText and "Other models have no gates" in parent.helpText
    assert "outcome.extra_nodes['gradient_gate']" in parent.helpText


# ---------------------------------------------------------------------------- options
@needs_grad
def test_parameter_defaults_are_the_engines(module, scene):
    engine = mmreg.get_method("grad").default_options()
    params = module.GradRegistrationLogic().getParameterNode()
    assert params.refineSimilarity == engine["refine_similarity"] == "mind"
    assert {c.option for c in module.METHOD_OPTIONS.controls} <= set(engine)
    assert engine["diffeomorphic"] is None  # the model decides: the shared checkbox shows the model's value
    assert (params.model, params.makeGateMaps, params.outputImageGate, params.outputGradientGate) == ("", False, None,
                                                                                                   None)
    from mmreg.methods.optimize import SIMILARITIES
    items = module.METHOD_OPTIONS.combo_items(status_with())["refineSimilarity"]
    assert [value for value, _, _ in items] == list(SIMILARITIES) == ["mind", "mi", "lncc", "mse"]
    assert module.METHOD_OPTIONS.engine_default_model() == mmreg.get_method("grad").default_model == "grad_mr_gated"
    assert [spec.name for spec in module.GATE_MAPS] == ["image_gate", "gradient_gate"]


def _card(tmp_path, folder, variant=None, description="", modalities=None, kind="gradnet"):
    path = tmp_path / folder
    path.mkdir()
    architecture = {"kind": kind} if variant is None else {"kind": kind, "variant": variant}
    card = {"architecture": architecture, "description": description, "spacing_mm": 4.0, "diffeomorphic": False}
    if modalities is not None:
        card["training"] = {"config": {"data": {"template_modalities": modalities}}}
    (path / "model.json").write_text(json.dumps(card))
    return str(path)


def test_model_selector_shows_variant_and_modality(options, tmp_path):
    """Every installed model (shipped and fine-tuned) with its variant (card) and modality pair (name, description or
    training data); the default model first."""
    status = status_with([
        {"name": "grad_mr_average", "source": "shipped", "path": _card(tmp_path, "a", "average")},
        {"name": "grad_mr_gated", "source": "shipped", "path": _card(tmp_path, "b", "gated"),
         "description": "grad MR-MR network, gated fusion."},
        {"name": "grad_mr_vm", "source": "shipped", "path": _card(tmp_path, "c", "vm")},
        {"name": "grad_mr_vmconcat", "source": "shipped", "path": _card(tmp_path, "d", "vm_concat")},
        {"name": "grad_ctmr_gated", "source": "shipped", "path": _card(tmp_path, "e", "gated")},
        {"name": "liver", "source": "user", "path": _card(tmp_path, "f", "gated", "Fine-tuned on our CT-MR pairs.")},
        {"name": "mine", "source": "user", "path": _card(tmp_path, "g", None, modalities=["T2", "PD"])},  # "gated"
        {"name": "abdomen", "source": "user", "path": _card(tmp_path, "h", "vm", modalities=["CT"])},
        {"name": "broken", "source": "shipped", "path": str(tmp_path / "missing")},
    ])
    items = options.model_items(status)
    assert [value for value, _, _ in items] == ["grad_mr_gated", "grad_mr_average", "grad_mr_vm", "grad_mr_vmconcat",
                                                "grad_ctmr_gated", "liver", "mine", "abdomen", "broken"]
    assert [label for _, label, _ in items] == [
        "grad_mr_gated (gated fusion, MR-MR) — default", "grad_mr_average (average fusion, MR-MR)",
        "grad_mr_vm (VM, MR-MR)", "grad_mr_vmconcat (VM(concat), MR-MR)", "grad_ctmr_gated (gated fusion, CT-MR)",
        "liver (gated fusion, CT-MR) (fine-tuned)", "mine (gated fusion, MR-MR) (fine-tuned)",
        "abdomen (VM, CT-MR) (fine-tuned)", "broken"]
    assert items[0][2] == "grad MR-MR network, gated fusion."
    assert options.model_items(status_with(available=False)) == [("", "Not available",
                                                                  "Method 'grad' has no trained model yet.")]


@pytest.mark.parametrize("name,description,modalities,expected", [
    ("grad_ctmr_gated", "", None, "CT-MR"),
    ("ct_mr_liver", "", None, "CT-MR"),
    ("mri_ct", "", None, "CT-MR"),
    ("grad_mr_vm", "", None, "MR-MR"),
    ("brain", "T1-T2 pairs of the clinic.", None, "MR-MR"),
    ("pelvis", "CT onto T2w MRI, 3 mm grid.", None, "CT-MR"),
    ("pelvis", "MR / CT pairs", None, "CT-MR"),
    ("x", "", ["CT"], "CT-MR"),
    ("x", "", ["T2", "PD"], "MR-MR"),
    ("x", "A model.", None, None),
    ("x", "CT only.", None, None),
])
def test_modality_pair(options, name, description, modalities, expected):
    card = {"description": description}
    if modalities is not None:
        card["training"] = {"config": {"data": {"template_modalities": modalities}}}
    assert options.modality_pair(name, card) == expected


def test_default_model_and_resolve(options, tmp_path):
    mo = options.METHOD_OPTIONS
    five = status_with([{"name": n, "source": "shipped"} for n in TEST_MODELS])
    assert options.engine_default_model() == "grad_mr_gated"
    assert options.default_model(five) == "grad_mr_gated"
    assert options.default_model(status_with([{"name": "mine", "source": "user"},
                                              {"name": "grad_ctmr_gated", "source": "shipped"}])) == "grad_ctmr_gated"
    assert options.default_model(status_with([{"name": "only", "source": "user"}])) == "only"
    assert options.default_model(status_with()) == ""
    values = {"model": "", "refineSimilarity": "mind", "refinementSteps": 0, "makeGateMaps": False}
    assert mo.changes(values, five) == {"model": "grad_mr_gated"}  # the panel shows what Apply runs
    assert mo.changes(dict(values, model="deleted"), five) == {"model": "grad_mr_gated"}
    assert mo.changes(dict(values, model="grad_mr_vm"), five) == {}
    assert mo.changes(dict(values, model=str(tmp_path)), five) == {}  # a model folder stays
    assert mo.problem(dict(values, refineSimilarity="ncc"), five) == (
        "Unknown refinement similarity 'ncc': choose one of mind, mi, lncc, mse.")
    assert mo.engine_options(values, five) == {"model": "grad_mr_gated"}  # similarity only with refinement steps
    assert mo.engine_options(dict(values, refinementSteps=5, refineSimilarity="mi", makeGateMaps=True), five) == {
        "model": "grad_mr_gated", "refine_similarity": "mi"}  # (makeGateMaps is not an engine option)


@needs_grad
def test_gate_controls_and_model_line_follow_the_model(options, models, tmp_path):
    """Gated model: 'Gate maps' enabled, its output selectors only when checked; another variant: all three disabled,
    saying that gate maps are only available for gated models, and the model line says it too."""
    from MMRegCommonLib import panel
    mo = options.METHOD_OPTIONS
    status = panel.method_status("grad")
    assert status.available and status.model_sets_diffeomorphic
    values = {"model": "grad_mr_gated", "refineSimilarity": "mind", "refinementSteps": 0, "makeGateMaps": False}
    states = mo.control_states(values, status)
    assert states["makeGateMaps"] == (True, "")
    assert states["outputImageGate"] == states["outputGradientGate"] == (False, options.GATES_OFF)
    assert states["refineSimilarity"] == (False, "Used only with refinement steps > 0 (Options).")
    states = mo.control_states(dict(values, makeGateMaps=True), status)
    assert states["outputImageGate"] == states["outputGradientGate"] == (True, "")
    for model, what in (("grad_mr_vm", "a VM"), ("grad_mr_average", "an average fusion"),
                        ("grad_mr_vmconcat", "a VM(concat)")):
        states = mo.control_states(dict(values, model=model, makeGateMaps=True), status)
        reason = f"Gate maps are only available for gated models; '{model}' is {what} model (no gates)."
        assert states["makeGateMaps"] == states["outputImageGate"] == states["outputGradientGate"] == (False, reason)
    assert mo.info_text(values, status) == (
        "'grad_mr_gated': gated fusion (an image branch and a gradient-map branch, their fields fused by learned "
        "gates); MR-MR pairs; network grid 4 mm; predicts a displacement. Constant-field test model, gated fusion, "
        "MR-MR.")
    assert mo.info_text(dict(values, model="grad_mr_vm"), status) == (
        "'grad_mr_vm': VM (the image branch alone, VoxelMorph baseline); MR-MR pairs; network grid 4 mm; predicts a "
        "displacement. Constant-field test model, VM baseline. Gate maps are only available for gated models.")
    folder = str(models / "grad" / "grad_mr_vmconcat")  # a model given as its folder: the variant from its card
    assert mo.info_text(dict(values, model=folder), status) == f"Model from the folder {folder} (VM(concat))."
    assert mo.control_states(dict(values, model=folder), status)["makeGateMaps"][0] is False
    assert mo.control_states(values, status_with(available=False))["makeGateMaps"] == (
        False, "Method 'grad' has no trained model yet.")
    enabled, checked, tip = panel.diffeomorphic_control(status, "grad_mr_gated")
    assert (enabled, checked) == (False, False) and "displacement field directly" in tip


# ---------------------------------------------------------------------------- registration with known fields
@needs_grad
def test_known_shift_on_an_oblique_anisotropic_grid(module, models, scene):
    """The constant field (0.5, -1, 1.5) voxels (z, y, x) of the 4 mm network grid is D @ (6, -4, 2) mm in LPS on an
    oblique, anisotropic fixed grid; the transform node's FromParent maps each fixed RAS point p to p + F u (RAS =
    LPS with x and y flipped), everywhere; the gate volumes lie on the fixed grid with image gate ~1 and gradient gate
    ~0; the inputs are unchanged."""
    import vtk
    fixed, fixed_image = oblique_volume(scene, "Oblique fixed", seed=0)
    moving, _ = oblique_volume(scene, "Oblique moving", seed=1)
    before = {n: arrays(n).copy() for n in (fixed, moving)}
    ids = node_ids(scene)
    outcome = module.GradRegistrationLogic().run(fixed, moving, model="grad_mr_gated", affine=False)
    u_lps = expected_displacement_lps(fixed_image)
    np.testing.assert_allclose(np.linalg.norm(u_lps), np.linalg.norm([6.0, -4.0, 2.0]), rtol=1e-12)
    # The engine's field (LPS, fixed grid) and the transform node (RAS), at voxel centres across the grid.
    field = sitk.GetArrayFromImage(outcome.result.displacement)
    np.testing.assert_allclose(field.reshape(-1, 3).mean(0), u_lps, atol=1e-3)
    assert float(np.abs(field - u_lps).max()) < 1e-3
    transform = outcome.transform_node.GetTransformFromParent()
    for index in ((0, 0, 0), (29, 25, 21), (15, 3, 17), (7, 20, 2)):
        p_lps = np.array(fixed_image.TransformIndexToPhysicalPoint(index))
        mapped = np.array(transform.TransformPoint(list(F @ p_lps)))
        np.testing.assert_allclose(mapped, F @ (p_lps + u_lps), atol=1e-3)
    # The gate volumes: the fixed volume's geometry, image gate sigmoid(30), gradient gate sigmoid(-30).
    gates = outcome.extra_nodes
    assert sorted(gates) == ["gradient_gate", "image_gate"] == sorted(outcome.report["extra_images"])
    assert [gates[k].GetName() for k in ("image_gate", "gradient_gate")] == ["Oblique moving image gate",
                                                                             "Oblique moving gradient gate"]
    expected_matrix, matrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    fixed.GetIJKToRASMatrix(expected_matrix)
    for node in gates.values():
        node.GetIJKToRASMatrix(matrix)
        np.testing.assert_allclose([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)],
                                   [[expected_matrix.GetElement(r, c) for c in range(4)] for r in range(4)], atol=1e-9)
        assert arrays(node).shape == (22, 26, 30)
    assert float(arrays(gates["image_gate"]).min()) > 1 - 1e-6
    assert float(arrays(gates["gradient_gate"]).max()) < 1e-6
    assert "<b>Map 'gradient_gate'</b>: volume 'Oblique moving gradient gate', values 0.000 to 0.000" in (
        outcome.summary_text())
    assert outcome.notes == []
    # Inputs: voxels unchanged, the fixed volume not moved; only the moving volume's parent transform is set.
    for node, array in before.items():
        np.testing.assert_array_equal(arrays(node), array)
    assert fixed.GetParentTransformNode() is None and moving.GetParentTransformNode() is outcome.transform_node
    assert node_ids(scene) - ids == set(outcome.created_node_ids) | {
        n.GetDisplayNode().GetID() for n in [outcome.volume_node] + list(gates.values())}


@needs_grad
@pytest.mark.parametrize("model,fraction", [("grad_mr_average", 0.5), ("grad_mr_vm", 1.0),
                                            ("grad_mr_vmconcat", 1.0)])
def test_models_without_gates_register_and_say_why(module, models, scene, model, fraction):
    """Average fusion halves the image branch's field; VM and VM(concat) take it; none makes gate volumes: chosen gate
    output volumes stay untouched, nothing fails, and the notes (and the results text) say why."""
    fixed, fixed_image = oblique_volume(scene, "Oblique fixed", seed=0)
    moving, _ = oblique_volume(scene, "Oblique moving", seed=1)
    chosen = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "My gradient gate")
    outcome = module.GradRegistrationLogic().run(fixed, moving, model=model, affine=False,
                                                 output_extra_images={"gradient_gate": chosen})
    field = sitk.GetArrayFromImage(outcome.result.displacement)
    assert float(np.abs(field - expected_displacement_lps(fixed_image, fraction)).max()) < 1e-3
    what = {"grad_mr_average": "an average fusion", "grad_mr_vm": "a VM", "grad_mr_vmconcat": "a VM(concat)"}[model]
    note = (f"Gate maps are only available for gated models: '{model}' is {what} model (no gates), so no gate "
            "volumes were made.")
    assert outcome.notes == [note] and note in outcome.summary_text()
    assert outcome.extra_nodes == {} and outcome.report["extra_images"] == []
    assert chosen.GetImageData() is None and chosen.GetScene() is scene
    assert not [n for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode") if "gate" in n.GetName()
                and n is not chosen]
    # Asked for no map: no note.
    assert module.GradRegistrationLogic().run(fixed, moving, model=model, affine=False, extra_images=()).notes == []


@needs_grad
def test_run_with_parameters_default_model_and_gate_outputs(module, models, scene, case):
    """From the parameter node: "" runs the default model (grad_mr_gated, also the engine's own choice among five),
    gate maps only when checked, written back into the parameters and refilled by the next run; refinement with the
    chosen similarity; a model given as its folder works, and a non-gated one makes no gate volume."""
    noise = sitk.GetImageFromArray(np.random.default_rng(1).random((16, 16, 16)).astype(np.float32))
    engine_alone = mmreg.register(noise, noise, "grad", affine=False)  # the module and the engine agree
    assert engine_alone.report["model_card"]["name"] == "grad_mr_gated"
    logic = module.GradRegistrationLogic()
    p = logic.getParameterNode()
    p.fixedVolume, p.movingVolume, p.affine = case["fixed"], case["moving"], False
    off = logic.run_with_parameters(p)  # "Gate maps" is off by default
    assert off.report["options"]["model"] == "grad_mr_gated" and off.extra_nodes == {} and off.notes == []
    assert p.outputImageGate is None and p.outputGradientGate is None
    p.makeGateMaps, p.refinementSteps, p.refineSimilarity = True, 2, "mi"
    on = logic.run_with_parameters(p)
    options = on.report["options"]
    assert (options["model"], options["refinement_steps"], options["refine_similarity"]) == ("grad_mr_gated", 2, "mi")
    assert p.outputImageGate is on.extra_nodes["image_gate"] and p.outputGradientGate is on.extra_nodes["gradient_gate"]
    again = logic.run_with_parameters(p)
    assert again.extra_nodes["gradient_gate"] is p.outputGradientGate is on.extra_nodes["gradient_gate"]
    assert len([n for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode") if "gate" in n.GetName()]) == 2
    # grad_ctmr_gated: gradient gate sigmoid(0) = 0.5, into the same output volumes.
    p.model, p.refinementSteps = "grad_ctmr_gated", 0
    half = logic.run_with_parameters(p)
    np.testing.assert_allclose(arrays(p.outputGradientGate), 0.5, atol=1e-6)
    assert half.extra_nodes["gradient_gate"] is p.outputGradientGate
    # A model folder with no gates: registered, no gate volume changed, the note.
    p.model = str(models / "grad" / "grad_mr_vm")
    vm = logic.run_with_parameters(p)
    assert vm.extra_nodes == {} and vm.notes[0].startswith(
        f"Gate maps are only available for gated models: '{p.model}' is a VM model")
    np.testing.assert_allclose(arrays(p.outputGradientGate), 0.5, atol=1e-6)


@needs_grad
def test_failure_while_making_a_gate_volume_removes_every_output(module, models, scene, case, monkeypatch):
    from mmreg_slicer import bridge

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bridge, "scalar_map_node_from_image", broken)  # after transform, volume and segmentation
    before = node_ids(scene)
    with pytest.raises(RuntimeError, match="out of memory"):
        module.GradRegistrationLogic().run(case["fixed"], case["moving"], case["moving_seg"], affine=False)
    assert node_ids(scene) == before
    assert case["moving"].GetParentTransformNode() is None


# ---------------------------------------------------------------------------- bad input, cancel, parameters
@needs_grad
def test_readable_errors_and_nothing_added(module, models, scene, case, tmp_path, monkeypatch):
    logic = module.GradRegistrationLogic()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "Labels")
    before = node_ids(scene)
    for kwargs, expected in (
            ({"output_extra_images": {"image_gate": labelmap}}, "must be a scalar volume"),
            ({"output_extra_images": {"gradient_gate": case["fixed"]}}, "must not be an input"),
            ({"output_extra_images": {"attention": case["fixed"]}}, "which this run does not make"),
            ({"model": "no_such_model"}, "no_such_model")):
        with pytest.raises(mmreg.MMRegError, match=expected):
            logic.run(case["fixed"], case["moving"], affine=False, **kwargs)
    with pytest.raises(mmreg.InputError, match="two different volumes"):
        logic.run(case["fixed"], case["fixed"])
    p = logic.getParameterNode()
    p.fixedVolume, p.movingVolume, p.refineSimilarity = case["fixed"], case["moving"], "ncc"
    with pytest.raises(mmreg.InputError, match="Unknown refinement similarity 'ncc'"):
        logic.run_with_parameters(p)
    assert node_ids(scene) == before and not logic.is_running
    # No model installed: the method is not available, with the reason, and Apply says it.
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(tmp_path / "none"))
    status = logic.method_status()
    assert not status.available and "Method 'grad' has no trained model yet" in status.reason
    from MMRegCommonLib import panel
    assert panel.apply_state(status, case["fixed"], case["moving"]) == (False, status.reason)
    with pytest.raises(mmreg.InputError, match="has no trained model yet"):
        logic.run(case["fixed"], case["moving"])
    assert node_ids(scene) == before


@needs_grad
def test_cancel_leaves_the_scene_unchanged(module, models, scene, case):
    logic = module.GradRegistrationLogic()
    before = node_ids(scene)
    seen = []

    def progress(fraction, message):
        seen.append(fraction)
        logic.cancel()  # what the Cancel button does, at the first report

    with pytest.raises(mmreg.CancelledError):
        logic.run(case["fixed"], case["moving"], case["moving_seg"], case["fixed_seg"], progress=progress)
    assert node_ids(scene) == before and seen and max(seen) < 0.5
    assert case["moving"].GetParentTransformNode() is None and not logic.is_running


def test_parameter_node_round_trip(module, scene, case):
    from MMRegCommonLib.testing import reload_module_node
    logic = module.GradRegistrationLogic()
    p = logic.getParameterNode()
    image_gate = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Image gate out")
    p.fixedVolume, p.movingVolume, p.fixedSegmentation = case["fixed"], case["moving"], case["fixed_seg"]
    p.model, p.device, p.refinementSteps, p.refineSimilarity = "grad_ctmr_gated", "cpu", 25, "mi"
    p.makeGateMaps, p.outputImageGate = True, image_gate
    reloaded, node = reload_module_node(scene, logic.moduleName)
    r = logic.parameterNodeClass(node)
    assert (r.fixedVolume.GetName(), r.movingVolume.GetName(), r.fixedSegmentation.GetName()) == (
        "Phantom fixed", "Phantom moving", "Phantom fixed segments")
    assert (r.model, r.device, r.refinementSteps, r.refineSimilarity, r.makeGateMaps) == (
        "grad_ctmr_gated", "cpu", 25, "mi", True)
    assert r.outputImageGate.GetName() == "Image gate out" and r.outputGradientGate is None
    assert r.movingSegmentation is None and r.affine is True


# ---------------------------------------------------------------------------- the panel's logic (no Qt needed)
@needs_grad
def test_widget_logic_for_model_and_gate_controls(module, models, scene, case):
    """The shared Widget's decisions for this panel, on stand-in widgets: the default model written into the node, the
    gate controls enabled for a gated model (outputs once 'Gate maps' is checked), disabled with the reason for a VM
    model, and Apply still enabled (no gates is not an error)."""
    from MMRegCommonLib.widget import RegistrationWidget
    logic = module.GradRegistrationLogic()
    params = logic.getParameterNode()
    names = module.METHOD_OPTIONS.parameters + ("makeGateMaps", "outputImageGate", "outputGradientGate")
    controls = {name: [SimpleNamespace(enabled=True, toolTip="")] for name in names}
    text = lambda: SimpleNamespace(text="")  # noqa: E731
    ui = SimpleNamespace(methodOptionsInfoLabel=text(), applyButton=SimpleNamespace(), statusLabel=text())
    widget = SimpleNamespace(logic=logic, _parameterNode=params, _controls=controls, ui=ui,
                             _status=logic.method_status())
    widget._controlWidgets = lambda: RegistrationWidget._controlWidgets(widget)
    widget._controlTooltips = {id(w): "From the .ui file." for ws in controls.values() for w in ws}
    RegistrationWidget._updateMethodControls(widget)
    assert params.model == "grad_mr_gated"
    RegistrationWidget._updateMethodControls(widget)
    assert ui.methodOptionsInfoLabel.text.startswith("'grad_mr_gated': gated fusion")
    assert controls["makeGateMaps"][0].enabled is True and controls["outputGradientGate"][0].enabled is False
    params.makeGateMaps = True
    RegistrationWidget._updateMethodControls(widget)
    assert controls["outputGradientGate"][0].enabled is True
    assert controls["outputGradientGate"][0].toolTip == "From the .ui file."
    params.model = "grad_mr_vm"
    RegistrationWidget._updateMethodControls(widget)
    gate = controls["makeGateMaps"][0]
    assert gate.enabled is False and gate.toolTip.startswith("Gate maps are only available for gated models")
    assert ui.methodOptionsInfoLabel.text.endswith("Gate maps are only available for gated models.")
    params.fixedVolume, params.movingVolume = case["fixed"], case["moving"]
    RegistrationWidget._updateApplyState(widget)
    assert ui.applyButton.enabled is True and ui.statusLabel.text.startswith("Ready")
