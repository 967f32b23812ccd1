"""DisentangledRegistration: cross-modality registration through disentangled content/style representations.

The engine method ``disentangled`` (:mod:`mmreg.methods.disentangled`): a representation model (RDM, MUNIT-like:
content encoders into a space shared by two modalities, style encoders, generators) learned first, then one
registration network trained through it (warped images translated into the other modality and compared there,
plus content consistency). The same network registers both directions: either image may be fixed.

The module is the shared panel (MMRegCommonLib) plus:

* its own controls (DisentangledRegistrationLib.options): the model with its two modalities (default
  ``disentangled_t1t2``; representation-only models of the first training stage are marked "cannot
  register", and Apply with one of them shows the engine's message), the direction built from the chosen
  model's modalities ("Moving is T2, fixed is T1" / "Moving is T1, fixed is T2": engine ``moving_domain``)
  and the refinement similarity (MIND by default);
* the translated moving volume: the warped moving image rendered in the fixed image's modality (e.g. the
  synthesised T1 of a T2 scan), on the fixed grid, values in [0, 1] (fixed 0..1 window), made when
  "Translated moving volume" is checked (engine ``translate``; only computed then), named "<moving>
  translated to <fixed modality>"; "Show translated moving" overlays it on the fixed volume.
"""
from __future__ import annotations

import contextlib
import math
import os

from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule

import slicer
from DisentangledRegistrationLib.options import (METHOD_OPTIONS, TRANSLATED, direction_items, domains_of_card,
                                                 other_domain)
from MMRegCommonLib.logic import ExtraImageOutput, RegistrationLogic
from MMRegCommonLib.module import configure_module
from MMRegCommonLib.networkoptions import read_card
from MMRegCommonLib.parameters import COMBO_PARAMETERS as SHARED_COMBO_PARAMETERS
from MMRegCommonLib.parameters import RegistrationParameters
from MMRegCommonLib.testing import RegistrationModuleTest, node_ids, set_constant_output, user_models
from MMRegCommonLib.widget import RegistrationWidget

#: The engine method this module runs (``mmreg register --method disentangled``).
METHOD = "disentangled"
#: Parameters whose combo boxes are filled at run time: the shared ones (the model selector shows the modalities),
#: the refinement similarity and the direction (its items follow the chosen model's modalities).
COMBO_PARAMETERS = SHARED_COMBO_PARAMETERS + ("refineSimilarity", "movingDomain")
#: The translated moving image (engine map "translated_moving") as a volume: fixed 0..1 window, grey; made when
#: "Translated moving volume" (``makeTranslated``) is checked; renamed "<moving> translated to <fixed modality>".
TRANSLATED_MOVING = ExtraImageOutput(TRANSLATED, "translated", value_range=(0.0, 1.0),
                                     output_parameter="outputTranslated", enable_parameter="makeTranslated",
                                     show_button="showTranslatedButton")

USAGE = (
    "<p><b>Use</b>: choose the fixed volume (stays in place) and the moving volume (deformed onto it), scans of the "
    "two modalities of the model (e.g. a T1 and a T2 of the same patient); optionally a moving segmentation "
    "(warped with the image) and a fixed segmentation (only for Dice). <b>Model</b>: the trained network with its "
    "two modalities; models marked 'representation only: cannot register' are the first training stage (Apply "
    "stops with the engine's explanation). <b>Direction</b>: which modality the moving volume is, e.g. 'Moving is "
    "T2, fixed is T1' or the reverse; the same network registers both. <b>Refinement steps</b> optimise the "
    "network's field further on this pair (slower, more accurate), with the chosen similarity (MIND by default). "
    "Apply registers; Cancel stops and leaves the scene unchanged.</p>"
    "<p><b>Translated moving volume</b>: the registered moving volume rendered in the fixed volume's modality (e.g. "
    "the synthesised T1 of your T2), on the fixed grid, intensities 0..1: the volume '&lt;moving&gt; translated to "
    "&lt;modality&gt;' ('Show translated moving' overlays it on the fixed volume). It is computed only when "
    "checked.</p>"
    "<p><b>Results</b>: a grid transform (fixed to moving: Slicer's 'from parent' direction; the moving volume is "
    "placed under it), the moving volume and segmentation resampled on the fixed grid, runtime, folding % and "
    "Dice per segment.</p>"
    "<p><b>Python console</b>: <code>logic = slicer.util.getModuleLogic('DisentangledRegistration'); "
    "outcome = logic.run(fixedVolume, movingVolume, movingSegmentation, model='disentangled_t1t2', "
    "moving_domain='T2')</code>; <code>outcome.extra_nodes['translated_moving']</code> is the translated moving "
    "volume. On files, without Slicer: <code>mmreg register FIXED MOVING --method disentangled -O "
    "moving_domain=T2</code>.</p>")


class DisentangledRegistration(ScriptedLoadableModule):
    """Module description shown by Slicer (title, category, help)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        configure_module(
            self.parent, "DisentangledRegistration", "Disentangled Registration (cross-modality)", METHOD,
            "Deformable registration of scans of two different modalities (e.g. T1 and T2) by a network trained "
            "through disentangled representations: content encoders map both modalities into a shared anatomy "
            "space, style encoders and generators render an image in the other modality, and the registration "
            "network learned to align images compared there. One network registers both directions (either scan "
            "may be fixed). Optional MIND refinement. The moving volume translated into the fixed volume's modality "
            "is available as a volume.",
            usage=USAGE)


@parameterNodeWrapper
class DisentangledRegistrationParameterNode(RegistrationParameters):
    """The shared parameters and the ``disentangled`` method's own.

    ``model`` (shared): chosen by the module's selector ("" becomes the default model).
    ``refineSimilarity``: similarity of the refinement (engine ``refine_similarity``: "mind", "mi", "lncc", "mse"),
    used when ``refinementSteps`` > 0. ``movingDomain``: the moving volume's modality, one of the model's two
    (engine ``moving_domain``; "" or one the model lacks becomes its second). ``makeTranslated``: make the
    translated moving volume (engine ``translate``); ``outputTranslated``: the scalar volume to fill with it
    (None: a new one).
    """

    refineSimilarity: str = "mind"
    movingDomain: str = ""
    makeTranslated: bool = True
    outputTranslated: slicer.vtkMRMLScalarVolumeNode


class DisentangledRegistrationLogic(RegistrationLogic):
    """Logic: ``run(fixed, moving, moving_segmentation=None, fixed_segmentation=None, ..., moving_domain=None)`` (see
    RegistrationLogic; ``outcome.extra_nodes["translated_moving"]`` is the translated moving volume)."""

    method_name = METHOD
    parameterNodeClass = DisentangledRegistrationParameterNode
    methodOptions = METHOD_OPTIONS
    extra_image_outputs = (TRANSLATED_MOVING,)

    def default_model_name(self, status) -> str | None:
        """The module's default model when none is chosen (``disentangled_t1t2`` when installed, never a
        representation-only model while another is installed; see
        :meth:`DisentangledRegistrationLib.options.DisentangledOptions.default_model`), None when none is installed."""
        return METHOD_OPTIONS.default_model(status) or None

    def run(self, fixed_volume, moving_volume, moving_segmentation=None, fixed_segmentation=None, *, method=None,
            extra_images=None, **options):
        """:meth:`RegistrationLogic.run`; ``moving_domain`` ("T1", "T2", ...: the moving volume's modality; None: the
        model's second) and the other keyword options go to the engine. The engine translates the moving image
        (``translate``) exactly when the translated volume is asked for (``extra_images``; by default it is),
        unless ``translate`` is given. The translated volume is named "<moving> translated to <fixed modality>" (a
        chosen output volume too, unless it has a name of the user's own)."""
        own = (method or self.method_name) == self.method_name
        if own and "translate" not in options:
            if extra_images is None:
                options["translate"] = True
            else:
                names = [extra_images] if isinstance(extra_images, str) else list(extra_images)
                options["translate"] = TRANSLATED in names
        outcome = RegistrationLogic.run(self, fixed_volume, moving_volume, moving_segmentation, fixed_segmentation,
                                        method=method, extra_images=extra_images, **options)
        node = outcome.extra_nodes.get(TRANSLATED)
        prefix = f"{moving_volume.GetName()} translated to "
        if own and node is not None and (node.GetID() in outcome.created_node_ids or node.GetName().startswith(prefix)):
            fixed_domain = self.fixed_domain(outcome)  # (a chosen output node keeps a name of the user's own)
            if fixed_domain and node.GetName() != prefix + fixed_domain:
                node.SetName(node.GetScene().GenerateUniqueName(prefix + fixed_domain))
        return outcome

    @staticmethod
    def fixed_domain(outcome) -> str:
        """The fixed image's modality in a run of ``disentangled`` (from the model's card and the run's
        ``moving_domain``); "" when the model's card cannot be read."""
        card = read_card((outcome.report.get("model_card") or {}).get("path") or "")
        if not card:
            return ""
        domains = domains_of_card(card)
        moving = (outcome.report.get("options") or {}).get("moving_domain") or domains[1]
        return other_domain(domains, moving)


class DisentangledRegistrationWidget(RegistrationWidget):
    """The shared panel with the model selector (modalities; representation-only models marked), the direction
    (refilled from the chosen model's modalities by the framework), the refinement similarity, the translated-volume
    output and its 'Show translated moving' button (connected by the framework, as :data:`TRANSLATED_MOVING` names
    it) (Resources/UI/DisentangledRegistration.ui)."""

    logicClass = DisentangledRegistrationLogic


# ---------------------------------------------------------------------------- self-test
#: Network grid spacing (mm) of the self-test's constant models.
TEST_MODEL_SPACING = 4.0
#: The small DisentangledNet of the self-test's models (shipped models use the default architecture).
TEST_ARCHITECTURE = {"rdm": {"channels": 4, "downsamplings": 2, "residual_blocks": 1, "style_dim": 4, "mlp_channels": 8,
                             "discriminator_channels": 4, "discriminator_levels": 2},
                     "registration": {"channels": [8, 8, 8, 8], "final_conv_channels": [8]}}
#: The constant intensity each generator of the test models renders: domain 0 (e.g. T1) 0.25, domain 1 (T2) 0.75.
TEST_TRANSLATED = (0.25, 0.75)


def save_constant_model(folder, shift_voxels, domains=("T1", "T2"), stage: str = "registration",
                        translated=TEST_TRANSLATED, description: str = ""):
    """Save a DisentangledNet with constant outputs (a test model, no training): its registration network predicts
    ``shift_voxels`` (voxels of the network grid, tensor order z, y, x) for any pair and either direction, and the
    generator of domain ``k`` renders the constant ``translated[k]`` (its last convolution 0, bias the logit), so the
    translated moving volume is ``translated[index of the fixed domain]`` everywhere. ``stage`` goes to the card's
    ``training.stage`` ("rdm": a representation-only model the engine refuses to register with). Returns the folder."""
    from pathlib import Path

    from mmreg.methods.disentangled import DisentangledNet, disentangled_size_multiple
    from mmreg.models import ModelCard, save_model
    architecture = dict(TEST_ARCHITECTURE, domains=list(domains))
    net = DisentangledNet(architecture)
    set_constant_output(net.registration, shift_voxels)
    for generator, value in zip(net.rdm.generator, translated):
        set_constant_output(generator, [math.log(value / (1.0 - value))])
    folder = Path(folder)
    card = ModelCard(name=folder.name, method=METHOD, architecture=architecture, spacing_mm=TEST_MODEL_SPACING,
                     multiple=disentangled_size_multiple(architecture), diffeomorphic=False,
                     description=description or f"Constant-output {'-'.join(domains)} test model ({stage} stage).",
                     training={"stage": stage})
    save_model(folder, net, card)
    return folder


class DisentangledRegistrationTest(RegistrationModuleTest):
    """Self-test, with numbers. The shared checks (method status, bad input, the phantom registration, cancel,
    parameter round trip) run the default model with :attr:`test_options`; without a model that can register (none
    installed, or only representation-only ones) they run the engine's ``optimize`` through the same Logic (see
    :meth:`registration_method`). Then the module's own, on constant-output test models the test writes itself (no
    training, so the numbers are exact): a T1-T2 model whose field is the phantom's known translation and whose
    generators render 0.25 (T1) and 0.75 (T2): the transform, Dice and the translated volume (name, fixed grid,
    0.25, 0..1 window) with "Moving is T2, fixed is T1" (:meth:`test_KnownShiftModel`), the reverse direction
    (0.75, "translated to T2", the same field: :meth:`test_Direction`), no translation when it is not asked for
    (:meth:`test_TranslationOff`), a representation-only model: the engine's message, scene and inputs unchanged
    (:meth:`test_RepresentationOnlyModel`); every shipped model (:meth:`test_Models`).

    The shared phantom checks with the shipped model run WITH MIND refinement (:attr:`test_options`): the shipped
    ``disentangled_t1t2`` (trained on brain T1/T2, not on this two-blob phantom) alone makes the affine start worse.
    Measured headless (one thread) after the affine pre-alignment (mean segment Dice 0.956: Body 0.960, Core 0.953):
    the network alone gives whole-phantom Dice 0.735 -> 0.930 (Body 0.917, Core 0.832; mean 0.874), points within
    1.99 mm, in either direction, which would fail the shared thresholds; with 50 MIND refinement steps 0.735 -> 0.968
    (Body 0.963, Core 0.947; mean 0.955), points within 0.88 mm, no folding (25 steps: 0.964, Core 0.927, 0.95 mm;
    100: 0.969, Core 0.936, 0.92 mm). The thresholds (:attr:`registration_dice` 0.93, :attr:`segment_dice` 0.9,
    :attr:`point_tolerance_mm` 1.5) leave a margin over the refined numbers; the network-alone numbers are reported
    (not thresholded) by :meth:`test_Models`."""

    logicClass = DisentangledRegistrationLogic
    #: The shipped network alone lowers the phantom's Dice below the affine start (mean 0.956 -> 0.874, Core 0.832,
    #: points 1.99 mm): the shared checks run it with MIND refinement, which brings it back to about the affine start
    #: (mean 0.955, Core 0.947 vs 0.953, points 0.88 mm), not beyond: on this phantom the network adds nothing.
    test_options = {"refinement_steps": 50}
    #: Measured with ``disentangled_t1t2`` + 50 refinement steps: whole-phantom Dice 0.968, Body 0.963, Core 0.947,
    #: points within 0.88 mm (see the class docstring).
    registration_dice = 0.93
    segment_dice = 0.9
    point_tolerance_mm = 1.5
    #: The known-shift model's transform versus the phantom's translation (mm, per coordinate).
    known_shift_tolerance_mm = 0.05

    def runTest(self):
        """Run every check, each on a fresh scene."""
        for check in (self.test_MethodStatus, self.test_BadInput, self.test_Registration, self.test_KnownShiftModel,
                      self.test_Direction, self.test_TranslationOff, self.test_RepresentationOnlyModel,
                      self.test_Models, self.test_Cancel, self.test_ParameterNodeRoundTrip):
            self.setUp()
            check()

    def registration_method(self) -> tuple:
        """The module's method with its default model when that model can register; else the fallback method (a
        representation-only model alone cannot register: the engine would refuse)."""
        if self.test_method:
            return self.test_method, dict(self.test_options)
        status = self._logic().method_status()
        if status.available and not METHOD_OPTIONS.representation_only(METHOD_OPTIONS.default_model(status), status):
            return METHOD, dict(self.test_options)
        return self.fallback_method, dict(self.fallback_options)

    @contextlib.contextmanager
    def _test_models(self):
        """Two constant-output models in a temporary user model folder (the user's own models are hidden meanwhile):
        "disentangled_selftest" (T1-T2, registration stage, field = the phantom's translation) and
        "disentangled_selftest_rdm" (the same, marked as a representation-only model of stage 1)."""
        import tempfile

        import numpy as np

        from MMRegCommonLib.testing import TRANSLATION_LPS
        # The phantom's fixed grid is axis-aligned (the network grid shares its direction): the translation in
        # network voxels, tensor order (z, y, x).
        shift = (np.asarray(TRANSLATION_LPS)[::-1] / TEST_MODEL_SPACING).tolist()
        with tempfile.TemporaryDirectory(prefix="mmreg-selftest-") as root:
            save_constant_model(os.path.join(root, METHOD, "disentangled_selftest"), shift,
                                description="Constant-output T1-T2 test model.")
            save_constant_model(os.path.join(root, METHOD, "disentangled_selftest_rdm"), shift, stage="rdm",
                                description="Constant-output T1-T2 test model (representation only).")
            with user_models(root):
                yield root

    def _run_test_model(self, moving_domain: str, make_translated: bool = True):
        """The phantom registered from the parameter node with "disentangled_selftest" and ``moving_domain``; returns
        ``(outcome, case, parameters, moving voxels before, direction items)``."""
        from MMRegCommonLib.testing import make_synthetic_pair
        with self._test_models():
            logic = self._logic()
            status = logic.method_status()
            case = make_synthetic_pair(slicer.mrmlScene)
            moving_voxels = slicer.util.arrayFromVolume(case["moving"]).copy()
            p = logic.getParameterNode()
            p.fixedVolume, p.movingVolume = case["fixed"], case["moving"]
            p.movingSegmentation, p.fixedSegmentation = case["moving_seg"], case["fixed_seg"]
            p.model, p.affine, p.refinementSteps = "disentangled_selftest", False, 0
            p.movingDomain, p.makeTranslated = moving_domain, make_translated
            items = METHOD_OPTIONS.value_combo_items(METHOD_OPTIONS.values(p), status)["movingDomain"]
            outcome = logic.run_with_parameters(p)
        return outcome, case, p, moving_voxels, items

    def _mapped_errors(self, outcome) -> list:
        import numpy as np

        from MMRegCommonLib.testing import BODY_CENTER, CORE_CENTER, F, TRANSLATION_LPS
        errors = []
        for point in (BODY_CENTER, CORE_CENTER, BODY_CENTER + np.array([-15.0, 10.0, 5.0])):
            mapped = np.array(outcome.transform_node.GetTransformFromParent().TransformPoint(list(F @ point)))
            errors.append(float(np.abs(mapped - F @ (point + TRANSLATION_LPS)).max()))
        return errors

    def _check_translated(self, outcome, case, parameters, value: float, fixed_domain: str):
        """The translated volume: name, the fixed volume's geometry, ``value`` everywhere, 0..1 window, in the
        parameter node. Returns its voxels."""
        import numpy as np
        import SimpleITK as sitk
        import vtk
        node = outcome.extra_nodes[TRANSLATED]
        self.assertEqual(node.GetName(), f"Phantom moving translated to {fixed_domain}")
        self.assertIs(parameters.outputTranslated, node)
        expected, matrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        case["fixed"].GetIJKToRASMatrix(expected)
        node.GetIJKToRASMatrix(matrix)
        np.testing.assert_allclose([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)],
                                   [[expected.GetElement(r, c) for c in range(4)] for r in range(4)], atol=1e-9)
        values = slicer.util.arrayFromVolume(node)
        self.assertEqual(values.shape, slicer.util.arrayFromVolume(case["fixed"]).shape)
        np.testing.assert_allclose(values, sitk.GetArrayFromImage(outcome.result.extra_images[TRANSLATED]), atol=1e-6)
        np.testing.assert_allclose(values, value, atol=1e-4)
        display = node.GetDisplayNode()
        self.assertEqual((display.GetWindowLevelMin(), display.GetWindowLevelMax()), (0.0, 1.0))
        return values

    def test_KnownShiftModel(self):
        """"Moving is T2, fixed is T1" with a constant-output model whose field is the phantom's translation, from the
        parameter node: the direction offered from the model's modalities, the transform maps fixed points to the
        moving ones (RAS), Dice per segment, the translated volume "<moving> translated to T1" on the fixed grid with
        the T1 generator's 0.25 and a 0..1 window; the moving voxels unchanged; the selector's label."""
        import numpy as np
        outcome, case, p, moving_voxels, items = self._run_test_model("T2")
        self.assertEqual([(value, label) for value, label, _ in items],
                         [("T2", "Moving is T2, fixed is T1"), ("T1", "Moving is T1, fixed is T2")])
        options = outcome.report["options"]
        self.assertEqual((options["model"], options["moving_domain"], options["translate"]),
                         ("disentangled_selftest", "T2", True))
        errors = self._mapped_errors(outcome)
        self.assertLess(max(errors), self.known_shift_tolerance_mm, errors)
        summary = outcome.summary()
        self.assertTrue(all(after > 0.9 for _, _, after in summary["dice"]), summary["dice"])
        self.assertEqual(summary["folding_percent"], 0.0)
        values = self._check_translated(outcome, case, p, 0.25, "T1")
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(case["moving"]), moving_voxels)
        self.assertIs(case["moving"].GetParentTransformNode(), outcome.transform_node)
        self.delayDisplay(f"Known-shift model, moving T2 onto fixed T1: fixed points mapped within {max(errors):.4f} "
                          "mm; Dice " + ", ".join(f"{n} {a:.3f} -> {b:.3f}" for n, a, b in summary["dice"])
                          + f"; translated to T1 {values.min():.4f}..{values.max():.4f}")

    def test_Direction(self):
        """"Moving is T1, fixed is T2": the same network gives the same field; the translation goes to T2 (0.75)."""
        outcome, case, p, _, _ = self._run_test_model("T1")
        self.assertEqual(outcome.report["options"]["moving_domain"], "T1")
        errors = self._mapped_errors(outcome)
        self.assertLess(max(errors), self.known_shift_tolerance_mm, errors)
        values = self._check_translated(outcome, case, p, 0.75, "T2")
        self.delayDisplay(f"Moving T1 onto fixed T2: points within {max(errors):.4f} mm; translated to T2 "
                          f"{values.min():.4f}..{values.max():.4f}")

    def test_TranslationOff(self):
        """"Translated moving volume" unchecked: the engine is asked not to translate, no translated volume is made."""
        outcome, _, p, _, _ = self._run_test_model("T2", make_translated=False)
        self.assertEqual(outcome.report["options"]["translate"], False)
        self.assertEqual(outcome.report["extra_images"], [])
        self.assertEqual(outcome.extra_nodes, {})
        self.assertIsNone(p.outputTranslated)
        self.assertEqual(len(slicer.util.getNodes("*translated*")), 0)
        self.assertLess(max(self._mapped_errors(outcome)), self.known_shift_tolerance_mm)
        self.delayDisplay("Translation off: registered, no translated volume")

    def test_RepresentationOnlyModel(self):
        """A model of the first training stage: labelled 'representation only: cannot register', never the default,
        the model line says why; Apply (the parameter node) gives the engine's message, and the scene, the inputs
        and the moving volume's parent are unchanged."""
        import mmreg
        import numpy as np

        from MMRegCommonLib.testing import make_synthetic_pair
        with self._test_models():
            logic = self._logic()
            status = logic.method_status()
            labels = {value: label for value, label, _ in METHOD_OPTIONS.model_items(status)}
            case = make_synthetic_pair(slicer.mrmlScene)
            voxels = {name: slicer.util.arrayFromVolume(case[name]).copy() for name in ("fixed", "moving")}
            p = logic.getParameterNode()
            p.fixedVolume, p.movingVolume, p.movingSegmentation = case["fixed"], case["moving"], case["moving_seg"]
            p.model, p.affine = "disentangled_selftest_rdm", False
            info = METHOD_OPTIONS.info_text(METHOD_OPTIONS.values(p), status)
            default = METHOD_OPTIONS.default_model(status)
            scene = slicer.mrmlScene
            before = node_ids(scene)
            with self.assertRaises(mmreg.InputError) as raised:
                logic.run_with_parameters(p)
        self.assertTrue(labels["disentangled_selftest_rdm"].startswith(
            "disentangled_selftest_rdm (T1-T2, representation only: cannot register)"), labels)
        self.assertNotEqual(default, "disentangled_selftest_rdm")
        self.assertIn("holds only the T1<->T2 representation", info)
        message = str(raised.exception)
        self.assertIn("Model 'disentangled_selftest_rdm' holds only the representation model (stage 1 of training)",
                      message)
        after = node_ids(scene)
        self.assertEqual(after, before)
        for name, array in voxels.items():
            np.testing.assert_array_equal(slicer.util.arrayFromVolume(case[name]), array)
        self.assertIsNone(case["moving"].GetParentTransformNode())
        self.assertIsNone(p.outputTransform)
        self.assertFalse(logic.is_running)
        self.delayDisplay("Representation-only model: " + message)

    def test_Models(self):
        """Each shipped model is listed with its modalities and runs by name on the phantom in both directions: a
        registration model makes the translated volume (values in 0..1) and its Dice is reported for the network
        alone (no refinement; not thresholded: ``disentangled_t1t2`` gives 0.956 (affine) -> 0.874 here, see the
        class docstring), a representation-only one gives the engine's message."""
        import mmreg

        from DisentangledRegistrationLib.options import model_domains
        from MMRegCommonLib.testing import make_synthetic_pair
        status = self._logic().method_status()
        shipped = [m for m in status.models if (m.info or {}).get("source") == "shipped"]
        if not shipped:
            self.delayDisplay(f"No shipped '{METHOD}' model installed: model checks skipped")
            return
        labels = {value: label for value, label, _ in METHOD_OPTIONS.model_items(status)}
        case = make_synthetic_pair(slicer.mrmlScene)
        lines = []
        for choice in shipped:
            domains = model_domains(choice)
            self.assertTrue(labels[choice.value].startswith(f"{choice.value} ({'-'.join(domains)}"), labels)
            if METHOD_OPTIONS.representation_only(choice.value, status):
                with self.assertRaisesRegex(mmreg.InputError, "holds only the representation model"):
                    self._logic().run(case["fixed"], case["moving"], model=choice.value)
                lines.append(f"{labels[choice.value]}: refused")
                continue
            for moving_domain, label, _ in direction_items(domains):
                outcome = self._logic().run(case["fixed"], case["moving"], case["moving_seg"], case["fixed_seg"],
                                            model=choice.value, moving_domain=moving_domain,
                                            place_moving_under_transform=False)
                self.assertEqual(outcome.report["options"]["model"], choice.value)
                values = slicer.util.arrayFromVolume(outcome.extra_nodes[TRANSLATED])
                self.assertTrue(0.0 <= float(values.min()) and float(values.max()) <= 1.0, (values.min(), values.max()))
                summary = outcome.summary()
                lines.append(f"{labels[choice.value]}, {label}: phantom Dice {summary['mean_dice_affine']:.3f} "
                             f"(affine) -> {summary['mean_dice']:.3f} (network alone), translated mean "
                             f"{float(values.mean()):.3f}, "
                             f"{summary['runtime_s']:.1f} s")
        self.delayDisplay("Models: " + "; ".join(lines))

    def test_ParameterNodeRoundTrip(self):
        """The shared parameters and the module's own come back after saving and reloading the scene."""
        from MMRegCommonLib.testing import reload_module_node
        RegistrationModuleTest.test_ParameterNodeRoundTrip(self)
        logic = self._logic()
        params = logic.getParameterNode()
        translated = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Translated out")
        params.model, params.refineSimilarity, params.movingDomain = "disentangled_t1t2", "mi", "T1"
        params.makeTranslated, params.outputTranslated = False, translated
        reloaded, node = reload_module_node(slicer.mrmlScene, logic.moduleName)
        restored = logic.parameterNodeClass(node)
        self.assertEqual((restored.model, restored.refineSimilarity, restored.movingDomain, restored.makeTranslated,
                          restored.outputTranslated.GetName()),
                         ("disentangled_t1t2", "mi", "T1", False, "Translated out"))
        self.delayDisplay("Module parameters round trip (model, refinement similarity, direction, translated volume)")
