"""The DisentangledRegistration module headless: its Slicer self-test, its options (model selector with each model's
modalities and representation-only models marked, default model, the direction built from the chosen model's
modalities, the translated-volume switch, refinement similarity), and its Logic directly: the known displacement of a
constant-output model in the transform node, the translated moving volume in both directions, no translation when it
is not wanted, the engine's message for a representation-only model, cancel, bad input and the parameter node.

The Logic tests use CONSTANT-OUTPUT DisentangledNets (tiny: RDM 4 channels, registration channels [8, 8, 8, 8], final
[8]) written to a temporary model folder as if shipped (the module's own
:func:`DisentangledRegistration.save_constant_model`): the last convolution of the registration network has zero
weights and the bias :data:`SHIFT_VOXELS`, so it predicts that field for any pair and either direction; the last
convolution of each generator has zero weights and the logit of 0.25 (domain 0) or 0.75 (domain 1) as bias, so the
translated moving volume is exactly 0.25 when the fixed image is of domain 0 ("Moving is T2, fixed is T1") and 0.75 the
other way. The numbers below are therefore exact and do not depend on training: the field is :data:`SHIFT_VOXELS`
voxels of the 4 mm network grid, whose axes are the fixed image's (oblique here), i.e. ``D @ (4 mm * shift in x, y,
z)`` = a vector of length |(6, -4, 2)| mm in LPS.

The self-test runs with the installed shipped models and its own constant-output test models; the user's model folder
is replaced by an empty one so that models being trained on this machine do not change it. With the shipped
``disentangled_t1t2`` its shared phantom checks run that model with 50 MIND refinement steps (the network alone lowers
the phantom's Dice below the affine start: see ``DisentangledRegistrationTest``); without a model that can register they
run the engine's ``optimize`` and its shipped-model check says it is skipped.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

import mmreg
from MMRegCommonLib.testing import node_ids, oblique_volume

HAS_METHOD = "disentangled" in mmreg.method_names()
needs_method = pytest.mark.skipif(not HAS_METHOD, reason="the engine has no 'disentangled' method")
#: The registration network's constant field of the test models, voxels of the network grid, tensor order (z, y, x).
SHIFT_VOXELS = (0.5, -1.0, 1.5)
#: The test models: name -> (domains, training stage, generator outputs). Named like the shipped ones.
TEST_MODELS = {
    "disentangled_t1t2": (("T1", "T2"), "registration", (0.25, 0.75)),
    "disentangled_t1t2_rdm": (("T1", "T2"), "rdm", (0.25, 0.75)),
    "disentangled_ctmr": (("CT", "MR"), "registration", (0.2, 0.9)),
}
F = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Two cores and training jobs beside the tests: the engine runs one thread (``MMREG_THREADS``)."""
    import torch
    before = torch.get_num_threads()
    monkeypatch.setenv("MMREG_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def constant_models(tmp_path_factory):
    """A model folder with the constant-output DisentangledNets of :data:`TEST_MODELS`."""
    module = importlib.import_module("DisentangledRegistration")
    root = tmp_path_factory.mktemp("disentangled-models")
    for name, (domains, stage, translated) in TEST_MODELS.items():
        module.save_constant_model(root / "disentangled" / name, SHIFT_VOXELS, domains, stage, translated,
                                   f"Constant-output test model {'-'.join(domains)}, {stage} stage.")
    return root


@pytest.fixture
def models(constant_models, tmp_path, monkeypatch):
    """Only the constant-output models are installed, as shipped ones; no user model."""
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(constant_models))
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "no user models"))
    return constant_models


@pytest.fixture
def module():
    return importlib.import_module("DisentangledRegistration")


@pytest.fixture
def options():
    return importlib.import_module("DisentangledRegistrationLib.options")


def arrays(node):
    import slicer
    return slicer.util.arrayFromVolume(node)


def matrix_of(node) -> np.ndarray:
    import vtk
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def engine_options() -> dict:
    return dict(mmreg.get_method("disentangled").default_options())


def status_with(models=(), available=True):
    """A method status like the engine's for 'disentangled' with the given listing entries."""
    from MMRegCommonLib import panel
    return panel.MethodStatus("disentangled", available,
                              "" if available else "Method 'disentangled' has no trained model yet.",
                              models=[panel.model_choice(m) for m in models], options=engine_options())


def card_folder(tmp_path, folder, domains=None, stage=None, description=""):
    path = tmp_path / folder
    path.mkdir()
    card = {"architecture": {"kind": "disentangled"}, "description": description, "spacing_mm": 4.0,
            "diffeomorphic": True}
    if domains is not None:
        card["architecture"]["domains"] = list(domains)
    if stage is not None:
        card["training"] = {"stage": stage}
    (path / "model.json").write_text(json.dumps(card))
    return str(path)


def expected_displacement_lps(image) -> np.ndarray:
    """The constant field of the test models in LPS mm on ``image``'s network grid (its direction, 4 mm voxels)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return direction @ (4.0 * np.array(SHIFT_VOXELS[::-1]))


# ---------------------------------------------------------------------------- the self-test
@needs_method
def test_self_test_runs_headless(module, scene, tmp_path, monkeypatch):
    """The same test class Slicer's Self Tests run (all its checks, via runTest), with the installed shipped models and
    no user model; its constant-output checks report exact numbers (transform within 0.05 mm of the phantom's
    translation, the translated volume 0.25 / 0.75 by direction, the engine's message for a stage-1 model)."""
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "no user models"))
    messages = []
    test = module.DisentangledRegistrationTest()
    test.delayDisplay = messages.append
    test.runTest()
    assert any(m.startswith("Known-shift model, moving T2 onto fixed T1: fixed points mapped within 0.0000 mm")
               and m.endswith("translated to T1 0.2500..0.2500") for m in messages), messages
    assert any(m.startswith("Moving T1 onto fixed T2: points within 0.0000 mm")
               and m.endswith("translated to T2 0.7500..0.7500") for m in messages), messages
    assert "Translation off: registered, no translated volume" in messages
    assert any(m.startswith("Representation-only model: Model 'disentangled_selftest_rdm' holds only the "
                            "representation model (stage 1 of training)") for m in messages), messages
    method, options = test.registration_method()
    if method == "disentangled":  # a shipped registration model: the phantom checks ran it, refined
        assert options == {"refinement_steps": 50}
        assert any(m.startswith("Registration (disentangled): Dice ") for m in messages), messages
        assert any(m.startswith("Models: ") and "(network alone)" in m for m in messages), messages
    else:
        assert any(m.startswith(f"Registration ({method}): Dice ") for m in messages), messages


@needs_method
def test_self_test_model_checks_with_shipped_models(module, models, scene):
    """The self-test's shipped-model check (skipped above while no disentangled model is shipped) on the constant-output
    models installed as shipped: each listed with its modalities, the registration models run in both directions with
    the translated volume (0.25/0.75, 0.2/0.9), the representation-only one refused with the engine's message."""
    messages = []
    test = module.DisentangledRegistrationTest()
    test.delayDisplay = messages.append
    test.setUp()
    test.test_Models()
    (line,) = messages
    for part in ("disentangled_t1t2 (T1-T2) — default, Moving is T2, fixed is T1: phantom Dice",
                 "translated mean 0.250", "disentangled_t1t2 (T1-T2) — default, Moving is T1, fixed is T2",
                 "translated mean 0.750", "disentangled_ctmr (CT-MR), Moving is MR, fixed is CT",
                 "translated mean 0.200",
                 "disentangled_ctmr (CT-MR), Moving is CT, fixed is MR", "translated mean 0.900",
                 "disentangled_t1t2_rdm (T1-T2, representation only: cannot register): refused"):
        assert part in line, line


@needs_method
def test_self_test_falls_back_when_only_a_representation_model_is_installed(module, constant_models, tmp_path,
                                                                            monkeypatch):
    """A user folder with only a stage-1 model (as on a machine where the RDM stage is trained and the registration
    stage not yet): the method is available, its default model is that one, so the shared registration checks run the
    fallback method (the engine would refuse) instead of failing."""
    import shutil
    shutil.copytree(constant_models / "disentangled" / "disentangled_t1t2_rdm",
                    tmp_path / "user" / "disentangled" / "disentangled_t1t2_rdm")
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "user"))
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(tmp_path / "none"))
    status = module.DisentangledRegistrationLogic().method_status()
    assert status.available and module.METHOD_OPTIONS.default_model(status) == "disentangled_t1t2_rdm"
    assert module.DisentangledRegistrationTest().registration_method() == ("optimize", {"levels": 1,
                                                                                        "iterations": [25]})
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(constant_models))  # with a registration model: the method, refined
    assert module.DisentangledRegistrationTest().registration_method() == ("disentangled", {"refinement_steps": 50})


def test_module_description(module):
    parent = SimpleNamespace()
    module.DisentangledRegistration(parent)
    assert parent.title == "Disentangled Registration (cross-modality)"
    assert parent.categories == ["Registration.Learning-based"]
    assert "--method disentangled" in parent.helpText and "moving_domain=T2" in parent.helpText
    assert "'Moving is T2, fixed is T1'" in parent.helpText
    assert "representation only: cannot register" in parent.helpText
    assert "outcome.extra_nodes['translated_moving']" in parent.helpText


# ---------------------------------------------------------------------------- options
@needs_method
def test_parameter_defaults_are_the_engines(module, scene):
    engine = engine_options()
    params = module.DisentangledRegistrationLogic().getParameterNode()
    assert params.refineSimilarity == engine["refine_similarity"] == "mind"
    assert engine["moving_domain"] is None and params.movingDomain == ""  # "" = the model's second modality
    assert engine["translate"] is True and params.makeTranslated is True
    # the engine's method is the network alone; the panel starts with the framework's refinement default
    from MMRegCommonLib.parameters import DEFAULT_REFINEMENT_STEPS
    assert engine["refinement_steps"] == 0 and params.refinementSteps == DEFAULT_REFINEMENT_STEPS == 20
    assert {c.option for c in module.METHOD_OPTIONS.controls} == {"model", "refine_similarity", "moving_domain",
                                                                  "translate"} <= set(engine)
    assert engine["diffeomorphic"] is None  # the model decides: the shared checkbox shows the model's value
    assert (params.model, params.outputTranslated) == ("", None)
    assert module.COMBO_PARAMETERS == ("model", "device", "refineSimilarity", "movingDomain")
    from mmreg.methods.optimize import SIMILARITIES
    items = module.METHOD_OPTIONS.combo_items(status_with())["refineSimilarity"]
    assert [value for value, _, _ in items] == list(SIMILARITIES) == ["mind", "mi", "lncc", "mse"]
    assert items[0][2].endswith("works across CT and MR or T1 and T2; the method's default.")
    assert module.METHOD_OPTIONS.engine_default_model() == mmreg.get_method("disentangled").default_model == (
        "disentangled_t1t2")
    assert [spec.name for spec in module.DisentangledRegistrationLogic.extra_image_outputs] == ["translated_moving"]
    assert module.TRANSLATED_MOVING.show_button == "showTranslatedButton"


def test_the_multimodal_similarities_are_shared_with_grad(options):
    grad = importlib.import_module("GradRegistrationLib.options")
    assert [v for v, _, _ in grad.REFINE_SIMILARITIES] == [v for v, _, _ in options.REFINE_SIMILARITIES]
    assert grad.REFINE_SIMILARITIES[0][2].endswith("T1 and T2; the method's default and its training loss.")
    assert grad.REFINE_SIMILARITIES[1:] == options.REFINE_SIMILARITIES[1:]


def test_model_selector_shows_modalities_and_marks_representation_models(options, tmp_path):
    """Every installed model with its two modalities (card), the default first, representation-only (stage 1) models
    last and labelled; the default model is never a representation-only one while another is installed."""
    status = status_with([
        {"name": "disentangled_t1t2_rdm", "source": "shipped", "path": card_folder(tmp_path, "a", ("T1", "T2"), "rdm")},
        {"name": "disentangled_t1t2", "source": "shipped", "path": card_folder(tmp_path, "b", ("T1", "T2"),
                                                                               "registration"),
         "description": "T1-T2 model."},
        {"name": "mine_rdm", "source": "user", "path": card_folder(tmp_path, "c", ("CT", "MR"), "rdm")},
        {"name": "clinic", "source": "user", "path": card_folder(tmp_path, "d", ("T1", "FLAIR"))},
        {"name": "old", "source": "user", "path": card_folder(tmp_path, "e")},  # no domains: the engine's T1-T2
        {"name": "broken", "source": "shipped", "path": str(tmp_path / "missing")},
    ])
    items = options.METHOD_OPTIONS.model_items(status)
    assert [(value, label) for value, label, _ in items] == [
        ("disentangled_t1t2", "disentangled_t1t2 (T1-T2) — default"),
        ("clinic", "clinic (T1-FLAIR) (fine-tuned)"), ("old", "old (T1-T2) (fine-tuned)"), ("broken", "broken"),
        ("disentangled_t1t2_rdm", "disentangled_t1t2_rdm (T1-T2, representation only: cannot register)"),
        ("mine_rdm", "mine_rdm (CT-MR, representation only: cannot register) (fine-tuned)")]
    assert items[0][2] == "T1-T2 model."
    # Default: the engine's default_model, else (never a representation-only model while another is installed) ...
    mo = options.METHOD_OPTIONS
    rdm_and_user = status_with([{"name": "disentangled_t1t2_rdm", "source": "shipped",
                                 "path": card_folder(tmp_path, "f", ("T1", "T2"), "rdm")},
                                {"name": "clinic", "source": "user", "path": card_folder(tmp_path, "g", ("T1", "T2"))}])
    assert mo.default_model(rdm_and_user) == "clinic"
    only_rdm = status_with([rdm_and_user.models[0].info])
    assert mo.default_model(only_rdm) == "disentangled_t1t2_rdm"  # (Apply then gives the engine's message)
    assert mo.default_model(status_with()) == ""
    assert mo.model_items(status_with(available=False)) == [("", "Not available",
                                                             "Method 'disentangled' has no trained model yet.")]


def test_direction_follows_the_chosen_model(options, tmp_path):
    """The direction combo box offers the chosen model's two modalities (the engine's default, moving = the second,
    first); a direction the model lacks ("" included) becomes its second modality, and the engine options follow."""
    mo = options.METHOD_OPTIONS
    status = status_with([
        {"name": "disentangled_t1t2", "source": "shipped", "path": card_folder(tmp_path, "a", ("T1", "T2"))},
        {"name": "ctmr", "source": "user", "path": card_folder(tmp_path, "b", ("CT", "MR"))}])
    values = {"model": "", "refineSimilarity": "mind", "movingDomain": "", "makeTranslated": True,
              "refinementSteps": 0}
    assert mo.changes(values, status) == {"model": "disentangled_t1t2", "movingDomain": "T2"}
    items = mo.value_combo_items(values, status)["movingDomain"]
    assert [(v, label) for v, label, _ in items] == [("T2", "Moving is T2, fixed is T1"),
                                                     ("T1", "Moving is T1, fixed is T2")]
    assert items[1][2].startswith("The moving volume is a T1 scan and the fixed volume a T2 scan.")
    t1 = dict(values, model="disentangled_t1t2", movingDomain="T1")
    assert mo.changes(t1, status) == {}
    assert mo.engine_options(t1, status) == {"model": "disentangled_t1t2", "moving_domain": "T1", "translate": True}
    ct = dict(t1, model="ctmr")  # another model: its own modalities
    assert mo.changes(ct, status) == {"movingDomain": "MR"}
    assert [(v, label) for v, label, _ in mo.value_combo_items(ct, status)["movingDomain"]] == [
        ("MR", "Moving is MR, fixed is CT"), ("CT", "Moving is CT, fixed is MR")]
    assert mo.engine_options(dict(ct, movingDomain="CT", makeTranslated=False, refinementSteps=10,
                                  refineSimilarity="mi"), status) == {
        "model": "ctmr", "refine_similarity": "mi", "moving_domain": "CT", "translate": False}
    folder = card_folder(tmp_path, "c", ("PD", "T2"))  # a model given as its folder: its card's modalities
    assert mo.resolve(dict(values, model=folder), status)["movingDomain"] == "T2"
    assert [v for v, _, _ in mo.value_combo_items(dict(values, model=folder, movingDomain="PD"), status)[
        "movingDomain"]] == ["T2", "PD"]
    assert mo.value_combo_items(values, status_with(available=False)) == {
        "movingDomain": [("", "Not available", "Method 'disentangled' has no trained model yet.")]}
    assert mo.problem(dict(values, refineSimilarity="ncc"), status) == (
        "Unknown refinement similarity 'ncc': choose one of mind, mi, lncc, mse.")


def test_control_states_and_model_line(options, tmp_path):
    mo = options.METHOD_OPTIONS
    status = status_with([
        {"name": "disentangled_t1t2", "source": "shipped",
         "path": card_folder(tmp_path, "a", ("T1", "T2"), "registration", "T1-T2 registration. Trained on IXI.")},
        {"name": "disentangled_t1t2_rdm", "source": "shipped",
         "path": card_folder(tmp_path, "b", ("T1", "T2"), "rdm")}])
    values = {"model": "disentangled_t1t2", "refineSimilarity": "mind", "movingDomain": "T2", "makeTranslated": True,
              "refinementSteps": 0}
    states = mo.control_states(values, status)
    assert states["outputTranslated"] == (True, "") and states["movingDomain"] == (True, "")
    assert states["refineSimilarity"] == (False, "Used only with refinement steps > 0 (Options).")
    assert mo.control_states(dict(values, makeTranslated=False), status)["outputTranslated"] == (
        False, "Check 'Translated moving volume' to make it.")
    assert mo.info_text(values, status) == (
        "'disentangled_t1t2': one network for both directions between T1 and T2, trained through a disentangled "
        "content/style representation; network grid 4 mm; predicts a velocity (diffeomorphic). T1-T2 registration.")
    assert mo.info_text(dict(values, model="disentangled_t1t2_rdm"), status) == (
        "Model 'disentangled_t1t2_rdm' holds only the T1<->T2 representation (stage 1 of training): its registration "
        "network is untrained, so Apply stops with an error. Choose a registration model, or train the registration "
        "stage with it (`[disentangled] rdm_model = \"disentangled_t1t2_rdm\"`).")
    unavailable = status_with(available=False)
    assert mo.control_states(values, unavailable)["outputTranslated"] == (
        False, "Method 'disentangled' has no trained model yet.")
    assert mo.info_text(values, unavailable) == ""


# ---------------------------------------------------------------------------- registration with known outputs
@needs_method
def test_known_shift_and_translated_volume_on_an_oblique_anisotropic_grid(module, models, scene):
    """The constant field (0.5, -1, 1.5) voxels (z, y, x) of the 4 mm network grid is D @ (6, -4, 2) mm in LPS on an
    oblique, anisotropic fixed grid; the transform node's FromParent maps each fixed RAS point p to p + F u; the
    translated volume "<moving> translated to T1" has the fixed volume's geometry and the T1 generator's 0.25 everywhere
    (moving T2, the default direction); the inputs are unchanged."""
    fixed, fixed_image = oblique_volume(scene, "Oblique fixed", seed=0)
    moving, _ = oblique_volume(scene, "Oblique moving", seed=1)
    before = {n: arrays(n).copy() for n in (fixed, moving)}
    ids = node_ids(scene)
    outcome = module.DisentangledRegistrationLogic().run(fixed, moving, model="disentangled_t1t2", affine=False)
    assert (outcome.report["options"]["moving_domain"], outcome.report["options"]["translate"]) == (None, True)
    u_lps = expected_displacement_lps(fixed_image)
    np.testing.assert_allclose(np.linalg.norm(u_lps), np.linalg.norm([6.0, -4.0, 2.0]), rtol=1e-12)
    field = sitk.GetArrayFromImage(outcome.result.displacement)
    assert float(np.abs(field - u_lps).max()) < 1e-3
    transform = outcome.transform_node.GetTransformFromParent()
    for index in ((0, 0, 0), (29, 25, 21), (15, 3, 17), (7, 20, 2)):
        p_lps = np.array(fixed_image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(transform.TransformPoint(list(F @ p_lps)), F @ (p_lps + u_lps), atol=1e-3)
    # The translated volume: the engine's map as a node on the fixed grid, named after the fixed modality.
    node = outcome.extra_nodes["translated_moving"]
    assert outcome.report["extra_images"] == ["translated_moving"]
    assert node.GetName() == "Oblique moving translated to T1"
    np.testing.assert_allclose(matrix_of(node), matrix_of(fixed), atol=1e-9)
    assert arrays(node).shape == (22, 26, 30)
    assert float(np.abs(arrays(node) - 0.25).max()) < 1e-4
    display = node.GetDisplayNode()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    assert ("<b>Map 'translated_moving'</b>: volume 'Oblique moving translated to T1', values 0.250 to 0.250"
            in outcome.summary_text())
    assert outcome.notes == []
    for n, array in before.items():
        np.testing.assert_array_equal(arrays(n), array)
    assert fixed.GetParentTransformNode() is None and moving.GetParentTransformNode() is outcome.transform_node
    assert node_ids(scene) - ids == set(outcome.created_node_ids) | {
        n.GetDisplayNode().GetID() for n in (outcome.volume_node, node)}


@needs_method
def test_direction_translation_switch_and_bad_direction(module, models, scene):
    """moving_domain "T1": the same field, the translation into T2 (0.75); extra_images=() asks the engine not to
    translate (no map, no node); translate=True without the node computes the map but makes no volume; CT-MR model:
    0.2 / 0.9; a modality the model lacks: the engine's error and nothing added."""
    fixed, fixed_image = oblique_volume(scene, "Oblique fixed", seed=0)
    moving, _ = oblique_volume(scene, "Oblique moving", seed=1)
    logic = module.DisentangledRegistrationLogic()
    reverse = logic.run(fixed, moving, model="disentangled_t1t2", affine=False, moving_domain="T1")
    assert float(np.abs(sitk.GetArrayFromImage(reverse.result.displacement)
                        - expected_displacement_lps(fixed_image)).max()) < 1e-3
    node = reverse.extra_nodes["translated_moving"]
    assert node.GetName() == "Oblique moving translated to T2" and float(np.abs(arrays(node) - 0.75).max()) < 1e-4
    off = logic.run(fixed, moving, model="disentangled_t1t2", affine=False, extra_images=())
    assert off.report["options"]["translate"] is False and off.report["extra_images"] == [] and off.extra_nodes == {}
    computed = logic.run(fixed, moving, model="disentangled_t1t2", affine=False, extra_images=(), translate=True)
    assert computed.report["extra_images"] == ["translated_moving"] and computed.extra_nodes == {}
    for moving_domain, value, name in (("MR", 0.2, "translated to CT"), ("CT", 0.9, "translated to MR")):
        ct = logic.run(fixed, moving, model="disentangled_ctmr", affine=False, moving_domain=moving_domain)
        assert ct.extra_nodes["translated_moving"].GetName() == f"Oblique moving {name}"
        assert float(np.abs(arrays(ct.extra_nodes["translated_moving"]) - value).max()) < 1e-4
    before = node_ids(scene)
    with pytest.raises(mmreg.InputError, match=r"moving_domain must be one of the model's modalities \(T1, T2\), got "
                                               r"'CT'"):
        logic.run(fixed, moving, model="disentangled_t1t2", affine=False, moving_domain="CT")
    assert node_ids(scene) == before and not logic.is_running


@needs_method
def test_run_with_parameters_default_model_direction_and_translated_output(module, models, scene, case):
    """From the parameter node: "" runs the default model (disentangled_t1t2, also the engine's own choice) with the
    default direction (moving T2); the translated volume is written back into the parameters and refilled by the next
    run (the other direction: 0.75 in the same node); unchecked, it is left as it was; refinement with MIND; a model
    given as its folder works."""
    noise = sitk.GetImageFromArray(np.random.default_rng(1).random((16, 16, 16)).astype(np.float32))
    engine_alone = mmreg.register(noise, noise, "disentangled", affine=False, threads=1)
    assert engine_alone.report["model_card"]["name"] == "disentangled_t1t2"  # the module and the engine agree
    logic = module.DisentangledRegistrationLogic()
    p = logic.getParameterNode()
    p.fixedVolume, p.movingVolume, p.affine = case["fixed"], case["moving"], False
    first = logic.run_with_parameters(p)
    options = first.report["options"]
    assert (options["model"], options["moving_domain"], options["translate"]) == ("disentangled_t1t2", "T2", True)
    translated = p.outputTranslated
    assert translated is first.extra_nodes["translated_moving"] and translated.GetName() == (
        "Phantom moving translated to T1")
    np.testing.assert_allclose(arrays(translated), 0.25, atol=1e-4)
    p.movingDomain = "T1"
    second = logic.run_with_parameters(p)
    assert second.extra_nodes["translated_moving"] is translated and translated.GetName() == (
        "Phantom moving translated to T2")  # the chosen output node: content replaced, its name follows
    np.testing.assert_allclose(arrays(translated), 0.75, atol=1e-4)
    assert len([n for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode") if "translated" in n.GetName()]) == 1
    p.makeTranslated, p.refinementSteps, p.movingDomain = False, 2, "T2"
    refined = logic.run_with_parameters(p)
    options = refined.report["options"]
    assert (options["refinement_steps"], options["refine_similarity"], options["translate"]) == (2, "mind", False)
    assert refined.extra_nodes == {} and p.outputTranslated is translated
    np.testing.assert_allclose(arrays(translated), 0.75, atol=1e-4)  # untouched
    p.makeTranslated = True
    refined = logic.run_with_parameters(p)  # the translation of a refined run: on the finer grid, the same values
    np.testing.assert_allclose(arrays(translated), 0.25, atol=1e-4)
    p.model, p.refinementSteps = str(models / "disentangled" / "disentangled_ctmr"), 0
    translated.SetName("My synthetic scan")  # a name of the user's own stays
    assert logic.run_with_parameters(p).report["options"]["moving_domain"] == "MR"  # resolved for that model
    np.testing.assert_allclose(arrays(translated), 0.2, atol=1e-4)
    assert translated.GetName() == "My synthetic scan"
    assert p.movingDomain == "T2"  # (Apply resolves without writing; the panel writes it back)


@needs_method
def test_representation_only_model_gives_the_engines_message(module, models, scene, case):
    """A stage-1 model: Apply stays enabled (the panel says why it will stop), and running it (console or parameter
    node) raises the engine's InputError; nothing is added, the inputs and the moving volume's parent are unchanged."""
    from MMRegCommonLib import panel
    logic = module.DisentangledRegistrationLogic()
    status = logic.method_status()
    assert panel.apply_state(status, case["fixed"], case["moving"])[0] is True
    voxels = {name: arrays(case[name]).copy() for name in ("fixed", "moving")}
    before = node_ids(scene)
    expected = (r"Model 'disentangled_t1t2_rdm' holds only the representation model \(stage 1 of training\); its "
                r"registration network is untrained. Train the registration stage with `\[disentangled\] rdm_model = "
                r"\"disentangled_t1t2_rdm\"`, or choose a registration model.")
    with pytest.raises(mmreg.InputError, match=expected):
        logic.run(case["fixed"], case["moving"], case["moving_seg"], case["fixed_seg"], model="disentangled_t1t2_rdm")
    p = logic.getParameterNode()
    p.fixedVolume, p.movingVolume, p.model = case["fixed"], case["moving"], "disentangled_t1t2_rdm"
    before = node_ids(scene)  # (the parameter node now exists)
    with pytest.raises(mmreg.InputError, match=expected):
        logic.run_with_parameters(p)
    assert node_ids(scene) == before and not logic.is_running
    for name, array in voxels.items():
        np.testing.assert_array_equal(arrays(case[name]), array)
    assert case["moving"].GetParentTransformNode() is None
    assert p.outputTransform is None and p.outputVolume is None and p.outputTranslated is None
    assert panel.user_message(mmreg.InputError("x")) == "x"  # the panel shows the engine's sentence as it is


# ---------------------------------------------------------------------------- bad input, cancel, parameters
@needs_method
def test_readable_errors_and_nothing_added(module, models, scene, case, tmp_path, monkeypatch):
    logic = module.DisentangledRegistrationLogic()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "Labels")
    before = node_ids(scene)
    for kwargs, expected in (
            ({"output_extra_images": {"translated_moving": labelmap}}, "must be a scalar volume"),
            ({"output_extra_images": {"translated_moving": case["moving"]}}, "must not be an input"),
            ({"output_extra_images": {"attention": case["fixed"]}}, "which this run does not make"),
            ({"model": "no_such_model"}, "no_such_model")):
        with pytest.raises(mmreg.MMRegError, match=expected):
            logic.run(case["fixed"], case["moving"], affine=False, **kwargs)
    p = logic.getParameterNode()
    p.fixedVolume, p.movingVolume, p.refineSimilarity = case["fixed"], case["moving"], "ncc"
    before = node_ids(scene)
    with pytest.raises(mmreg.InputError, match="Unknown refinement similarity 'ncc'"):
        logic.run_with_parameters(p)
    assert node_ids(scene) == before and not logic.is_running
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(tmp_path / "none"))  # no model installed: not available, why
    status = logic.method_status()
    assert not status.available and "Method 'disentangled' has no trained model yet" in status.reason
    from MMRegCommonLib import panel
    assert panel.apply_state(status, case["fixed"], case["moving"]) == (False, status.reason)
    with pytest.raises(mmreg.InputError, match="has no trained model yet"):
        logic.run(case["fixed"], case["moving"])
    assert node_ids(scene) == before


@needs_method
def test_cancel_leaves_the_scene_unchanged(module, models, scene, case):
    logic = module.DisentangledRegistrationLogic()
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
    logic = module.DisentangledRegistrationLogic()
    p = logic.getParameterNode()
    translated = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Translated out")
    p.fixedVolume, p.movingVolume, p.fixedSegmentation = case["fixed"], case["moving"], case["fixed_seg"]
    p.model, p.device, p.refinementSteps, p.refineSimilarity = "disentangled_ctmr", "cpu", 25, "mi"
    p.movingDomain, p.makeTranslated, p.outputTranslated = "CT", False, translated
    reloaded, node = reload_module_node(scene, logic.moduleName)
    r = logic.parameterNodeClass(node)
    assert (r.fixedVolume.GetName(), r.movingVolume.GetName(), r.fixedSegmentation.GetName()) == (
        "Phantom fixed", "Phantom moving", "Phantom fixed segments")
    assert (r.model, r.device, r.refinementSteps, r.refineSimilarity, r.movingDomain, r.makeTranslated) == (
        "disentangled_ctmr", "cpu", 25, "mi", "CT", False)
    assert r.outputTranslated.GetName() == "Translated out" and r.movingSegmentation is None and r.affine is True


# ---------------------------------------------------------------------------- the panel's logic (no Qt needed)
class FakeCombos:
    """The framework's ParameterCombos as the Widget uses it, recording what it fills."""

    def __init__(self, bindings):
        self.items = {binding: None for binding in bindings}
        self.fills = []

    def __contains__(self, binding):
        return binding in self.items

    def fill(self, binding, items):
        self.items[binding] = items
        self.fills.append(binding)


@needs_method
def test_widget_logic_for_direction_and_translated_output(module, models, scene, case):
    """The shared Widget's decisions for this panel, on stand-in widgets: the default model and direction written into
    the node, the direction combo box filled from the model's modalities (refilled only when they change), the
    translated-volume selector enabled only while checked, a representation-only model's line, Apply enabled."""
    from MMRegCommonLib.widget import RegistrationWidget
    logic = module.DisentangledRegistrationLogic()
    params = logic.getParameterNode()
    names = module.METHOD_OPTIONS.parameters + ("outputTranslated",)
    controls = {name: [SimpleNamespace(enabled=True, toolTip="")] for name in names}
    text = lambda: SimpleNamespace(text="")  # noqa: E731
    ui = SimpleNamespace(methodOptionsInfoLabel=text(), applyButton=SimpleNamespace(), statusLabel=text())
    combos = FakeCombos(module.COMBO_PARAMETERS)
    widget = SimpleNamespace(logic=logic, _parameterNode=params, _controls=controls, ui=ui, _combos=combos,
                             _valueComboItems={}, _status=logic.method_status())
    widget._controlWidgets = lambda: RegistrationWidget._controlWidgets(widget)
    widget._controlTooltips = {id(w): "From the .ui file." for ws in controls.values() for w in ws}
    RegistrationWidget._updateMethodControls(widget)  # writes the resolved values (the Modified event calls again)
    assert (params.model, params.movingDomain) == ("disentangled_t1t2", "T2") and combos.fills == []
    RegistrationWidget._updateMethodControls(widget)
    assert [(v, label) for v, label, _ in combos.items["movingDomain"]] == [("T2", "Moving is T2, fixed is T1"),
                                                                          ("T1", "Moving is T1, fixed is T2")]
    assert ui.methodOptionsInfoLabel.text.startswith("'disentangled_t1t2': one network for both directions")
    assert controls["outputTranslated"][0].enabled is True
    params.movingDomain = "T1"
    RegistrationWidget._updateMethodControls(widget)
    assert combos.fills == ["movingDomain"]  # same model: not refilled
    params.makeTranslated = False
    RegistrationWidget._updateMethodControls(widget)
    selector = controls["outputTranslated"][0]
    assert selector.enabled is False and selector.toolTip == "Check 'Translated moving volume' to make it."
    params.model = "disentangled_ctmr"
    RegistrationWidget._updateMethodControls(widget)
    assert params.movingDomain == "MR"
    RegistrationWidget._updateMethodControls(widget)
    assert combos.fills == ["movingDomain", "movingDomain"]
    assert [v for v, _, _ in combos.items["movingDomain"]] == ["MR", "CT"]
    params.model = "disentangled_t1t2_rdm"
    RegistrationWidget._updateMethodControls(widget)
    RegistrationWidget._updateMethodControls(widget)
    assert ui.methodOptionsInfoLabel.text.startswith("Model 'disentangled_t1t2_rdm' holds only the T1<->T2 "
                                                     "representation")
    params.fixedVolume, params.movingVolume = case["fixed"], case["moving"]
    RegistrationWidget._updateApplyState(widget)
    assert ui.applyButton.enabled is True and ui.statusLabel.text.startswith("Ready")


def test_show_extra_image_is_the_frameworks(module):
    """The 'Show translated moving' button is connected by the framework (the map's show_button), as GradRegistration's
    and MultiscaleRegistration's buttons; a run without the map shows nothing."""
    from MMRegCommonLib.logic import RegistrationOutcome
    grad = importlib.import_module("GradRegistration")
    multiscale = importlib.import_module("MultiscaleRegistration")
    assert {s.show_button for s in grad.GradRegistrationLogic.extra_image_outputs} == {"", "showGateButton"}
    assert [s.show_button for s in multiscale.MultiscaleRegistrationLogic.extra_image_outputs] == [
        "showAttentionButton"]
    outcome = RegistrationOutcome(None, None, None, None)
    assert module.DisentangledRegistrationLogic().show_extra_image(outcome, None, "translated_moving") is None


@needs_method
def test_symmetric_checkbox_reaches_the_engine_for_velocity_models_only(module, models, scene, case):
    """The shared "symmetric" parameter: dropped (the method's default, off) for the installed test models, which
    predict a displacement; passed to the engine for a model that predicts a velocity (the shipped T1-T2 model,
    given as its folder)."""
    from MMRegCommonLib import panel
    logic = module.DisentangledRegistrationLogic()
    p = logic.getParameterNode()
    assert p.symmetric is False
    p.fixedVolume, p.movingVolume, p.affine, p.refinementSteps = case["fixed"], case["moving"], False, 0
    p.symmetric = True
    assert logic.run_with_parameters(p).report["options"]["symmetric"] is False  # a displacement test model
    shipped = Path(module.__file__).resolve().parents[1] / "Resources" / "Models" / "disentangled" / "disentangled_t1t2"
    p.model = str(shipped)
    assert logic.run_with_parameters(p).report["options"]["symmetric"] is True
    p.symmetric = False
    assert logic.run_with_parameters(p).report["options"]["symmetric"] is False
    velocity = panel.MethodStatus("net", True, models=[panel.model_choice({"name": "v", "diffeomorphic": True})],
                                  options={"symmetric": False})
    assert logic._symmetric_option(SimpleNamespace(symmetric=True), velocity, "v") == {"symmetric": True}
    assert logic._symmetric_option(SimpleNamespace(symmetric=False), velocity, "v") == {}
