"""GradRegistration: dual-branch image + gradient-map registration with gated fusion (multi-modal: CT-MR, T1-T2/PD).

The engine method ``grad`` (:mod:`mmreg.methods.grad`): GradNet reads the fixed and the moving image and their
gradient-magnitude maps (which outline organ boundaries in any modality). An image branch and a gradient branch
(VoxelMorph U-Nets) each predict a displacement field; a gated fusion (learned per-voxel gates) or an average
fuses them. The paper's baselines are models of the same method: the image branch alone ("VM") and one branch
reading the images and their gradient maps ("VM(concat)"). The model selector shows each model's variant and
modality pair.

The module is the shared panel (MMRegCommonLib) plus:

* its own controls (GradRegistrationLib.options): the model with its variant and modality pair (default
  ``grad_mr_gated``) and the refinement similarity (MIND by default);
* the gate maps of a gated model as scalar volumes on the fixed grid ("<moving> image gate" and "<moving>
  gradient gate", values in (0, 1), shown with a fixed 0..1 window), made when "Gate maps" is checked, from
  the engine's ``RegistrationResult.extra_images`` by the framework
  (:class:`MMRegCommonLib.logic.ExtraImageOutput`). Where the gradient gate is high the network trusted the
  edges. A model without gates makes none: the run says so in its notes and does not fail.
"""
from __future__ import annotations

import contextlib
import os

from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule

import slicer
from GradRegistrationLib.options import (GATE_MAP_NAMES, GATED, METHOD_OPTIONS, default_model,
                                         gates_unavailable_note)
from MMRegCommonLib.logic import ExtraImageOutput, RegistrationLogic
from MMRegCommonLib.module import configure_module
from MMRegCommonLib.parameters import COMBO_PARAMETERS as SHARED_COMBO_PARAMETERS
from MMRegCommonLib.parameters import RegistrationParameters
from MMRegCommonLib.testing import RegistrationModuleTest, set_constant_output, user_models
from MMRegCommonLib.widget import RegistrationWidget

#: The engine method this module runs (``mmreg register --method grad``).
METHOD = "grad"
#: Parameters whose combo boxes are filled at run time: the shared ones (the model selector shows variant and
#: modality pair) and the refinement similarity.
COMBO_PARAMETERS = SHARED_COMBO_PARAMETERS + ("refineSimilarity",)
#: The gate maps of a gated GradNet (engine maps "image_gate" and "gradient_gate") as volumes: fixed 0..1 window,
#: Viridis colours; both made when "Gate maps" (``makeGateMaps``) is checked.
IMAGE_GATE = ExtraImageOutput("image_gate", "image gate", value_range=(0.0, 1.0),
                              color_node_id="vtkMRMLColorTableNodeFileViridis.txt", output_parameter="outputImageGate",
                              enable_parameter="makeGateMaps")
GRADIENT_GATE = ExtraImageOutput("gradient_gate", "gradient gate", value_range=(0.0, 1.0),
                                 color_node_id="vtkMRMLColorTableNodeFileViridis.txt",
                                 output_parameter="outputGradientGate", enable_parameter="makeGateMaps",
                                 show_button="showGateButton")
GATE_MAPS = (IMAGE_GATE, GRADIENT_GATE)

USAGE = (
    "<p><b>Use</b>: choose the fixed volume (stays in place) and the moving volume (deformed onto it), e.g. an MR "
    "and a CT of the same patient, or a T1 and a T2/PD; optionally a moving segmentation (warped with the image) and "
    "a fixed segmentation (only for Dice). <b>Model</b>: the trained network, shown with its variant (gated fusion: "
    "the paper's method; average fusion; VM and VM(concat): the baselines) and the modality pair it was trained "
    "for (CT-MR or MR-MR); choose the one that matches your scans. <b>Refinement steps</b> optimise the network's "
    "field further on this pair (slower, more accurate), with the chosen similarity (MIND by default). Apply "
    "registers; Cancel stops and leaves the scene unchanged.</p>"
    "<p><b>Gate maps</b> (gated models only): check 'Gate maps' to get the network's per-voxel gates (0..1) as the "
    "volumes '&lt;moving&gt; image gate' and '&lt;moving&gt; gradient gate' on the fixed grid ('Show gradient "
    "gate' overlays it on the fixed volume): where the gradient gate is high the network trusted the edges of the "
    "gradient maps. Other models have no gates: the panel says so and makes none.</p>"
    "<p><b>Results</b>: a grid transform (fixed to moving: Slicer's 'from parent' direction; the moving volume is "
    "placed under it), the moving volume and segmentation resampled on the fixed grid, runtime, folding % and "
    "Dice per segment.</p>"
    "<p><b>Python console</b>: <code>logic = slicer.util.getModuleLogic('GradRegistration'); "
    "outcome = logic.run(fixedVolume, movingVolume, movingSegmentation, model='grad_ctmr_gated')</code>; "
    "<code>outcome.extra_nodes['gradient_gate']</code> is the gradient gate volume (gated models). On files, "
    "without Slicer: <code>mmreg register FIXED MOVING --method grad</code>.</p>")


class GradRegistration(ScriptedLoadableModule):
    """Module description shown by Slicer (title, category, help)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        configure_module(
            self.parent, "GradRegistration", "Gradient-map Registration (dual branch)", METHOD,
            "Deformable registration of scans of different kinds (CT-MR, T1-T2/PD) by a dual-branch network: an "
            "image branch and a gradient-magnitude branch (organ boundaries) each predict a displacement field, "
            "and learned gates fuse them; trained with MIND on the images and on the gradient maps. The VoxelMorph "
            "and VoxelMorph(concat) baselines and the average fusion are models of the same method. Optional "
            "instance-optimisation refinement. The gate maps of gated models are shown as volumes.",
            usage=USAGE)


@parameterNodeWrapper
class GradRegistrationParameterNode(RegistrationParameters):
    """The shared parameters and the ``grad`` method's own.

    ``model`` (shared): chosen by the module's selector ("" becomes the default model).
    ``refineSimilarity``: similarity of the refinement (engine ``refine_similarity``: "mind", "mi",
    "lncc", "mse"), used when ``refinementSteps`` > 0. ``makeGateMaps``: make the image and gradient gate
    volumes (gated models only); ``outputImageGate`` / ``outputGradientGate``: the scalar volumes to fill
    with them (None: new ones).
    """

    refineSimilarity: str = "mind"
    makeGateMaps: bool = False
    outputImageGate: slicer.vtkMRMLScalarVolumeNode
    outputGradientGate: slicer.vtkMRMLScalarVolumeNode


class GradRegistrationLogic(RegistrationLogic):
    """Logic: ``run(fixed, moving, moving_segmentation=None, fixed_segmentation=None, ...)`` (see RegistrationLogic;
    ``outcome.extra_nodes["image_gate"]`` and ``["gradient_gate"]`` are the gate volumes of a gated model)."""

    method_name = METHOD
    parameterNodeClass = GradRegistrationParameterNode
    methodOptions = METHOD_OPTIONS
    extra_image_outputs = GATE_MAPS

    def default_model_name(self, status) -> str | None:
        """The module's default model when none is chosen (``grad_mr_gated`` when installed; see
        :func:`GradRegistrationLib.options.default_model`), None when no model is installed."""
        return default_model(status) or None

    def run(self, fixed_volume, moving_volume, moving_segmentation=None, fixed_segmentation=None, *, model=None,
            method=None, extra_images=None, output_extra_images=None, **options):
        """:meth:`RegistrationLogic.run`; gate maps asked for (by default: both) with a model that has no gates
        (average fusion, VM, VM(concat)) are not made and the outcome's notes say why (no error)."""
        note = None
        if (method or self.method_name) == self.method_name:
            extra_images, output_extra_images, note = self._gate_request(model, extra_images, output_extra_images)
        outcome = RegistrationLogic.run(self, fixed_volume, moving_volume, moving_segmentation, fixed_segmentation,
                                        model=model, method=method, extra_images=extra_images,
                                        output_extra_images=output_extra_images, **options)
        if note:
            outcome.notes.append(note)
        return outcome

    def _gate_request(self, model, extra_images, output_extra_images) -> tuple:
        """``(extra_images, output_extra_images, note)``: without the gate maps when the model that runs is known to
        have no gates (its card's variant), with the note saying so; unchanged otherwise."""
        status = self.method_status()
        if not status.available:
            return extra_images, output_extra_images, None  # (the run says why)
        name = model or self.default_model_name(status) or ""
        variant = METHOD_OPTIONS.variant_of(str(name), status)
        if variant is None or variant == GATED:
            return extra_images, output_extra_images, None
        if extra_images is None:
            names = [spec.name for spec in self.extra_image_outputs]
        else:
            names = [extra_images] if isinstance(extra_images, str) else list(extra_images)
        if not set(names) & set(GATE_MAP_NAMES):
            return extra_images, output_extra_images, None
        kept = [n for n in names if n not in GATE_MAP_NAMES]
        outputs = {k: v for k, v in (output_extra_images or {}).items() if k not in GATE_MAP_NAMES}
        return kept, outputs, gates_unavailable_note(str(name), variant)

    def show_gate(self, outcome, fixed_volume, name: str = "gradient_gate") -> None:
        """Slice views: the fixed volume as background, the gate volume ``name`` over it (50 %)."""
        self.show_extra_image(outcome, fixed_volume, name)


class GradRegistrationWidget(RegistrationWidget):
    """The shared panel with the model selector (variant, modality pair), refinement similarity, the gate-map
    outputs and a 'Show gradient gate' button (Resources/UI/GradRegistration.ui; the framework connects it, as
    :data:`GRADIENT_GATE` names it, and logs the notes of a run, e.g. that a model has no gates)."""

    logicClass = GradRegistrationLogic


# ---------------------------------------------------------------------------- self-test
#: Network grid spacing (mm) of the self-test's constant-field models.
TEST_MODEL_SPACING = 4.0
#: The small GradNet of the self-test's models (8 channels; the shipped models use the default architecture).
TEST_ARCHITECTURE = {"channels": [8, 8, 8, 8, 8, 8, 8, 8], "final_conv_channels": [8]}


def save_constant_model(folder, shift_voxels, variant: str = "gated", gradient_gate_bias: float = -30.0,
                        description: str = ""):
    """Save a GradNet whose fields are constant (a test model, no training): the image branch predicts
    ``shift_voxels`` (voxels of the network grid, tensor order z, y, x), the gradient branch 0; for "gated" the gate
    biases are +30 (image gate ~1) and ``gradient_gate_bias`` (gradient gate sigmoid(bias)). So the fused field is
    ``shift_voxels`` (gated with the gradient gate ~0; "vm", "vm_concat"), or half of it ("average"). Returns the
    model folder."""
    from pathlib import Path

    import torch

    from mmreg.models import ModelCard, save_model
    from mmreg.networks import DEFAULT_GRAD_ARCHITECTURE, gradnet
    architecture = dict(DEFAULT_GRAD_ARCHITECTURE, **TEST_ARCHITECTURE, variant=variant)
    net = gradnet(architecture)
    set_constant_output(net.image_branch, shift_voxels)
    if net.dual:
        set_constant_output(net.gradient_branch, (0.0, 0.0, 0.0))
    with torch.no_grad():
        if variant == "gated":
            net.gate.bias.copy_(torch.tensor([30.0] * 3 + [float(gradient_gate_bias)] * 3))
    folder = Path(folder)
    card = ModelCard(name=folder.name, method=METHOD, architecture=architecture, spacing_mm=TEST_MODEL_SPACING,
                     multiple=16, diffeomorphic=False,
                     description=description or f"Constant-field GradNet ({variant}) for the self-test.")
    save_model(folder, net, card)
    return folder


class GradRegistrationTest(RegistrationModuleTest):
    """Self-test, with numbers. The shared checks (method status, bad input, the phantom registration, cancel,
    parameter round trip) run the default model with :attr:`test_options`; without a trained ``grad`` model they
    run the engine's ``optimize`` through the same Logic (see RegistrationModuleTest). Then the module's own:
    constant-field test models written by the test itself (no training, so the numbers are exact): a gated one
    whose field is the phantom's known translation (transform within :attr:`known_shift_tolerance_mm`, Dice, gate
    volumes ~1 and ~0: :meth:`test_KnownShiftModel`) and a VM one (no gate volumes, the note:
    :meth:`test_NoGatesModel`); every shipped model with its variant and modality pair (:meth:`test_Models`).

    The phantom thresholds for the shipped model (trained on brain MR/CT-MR, not on this two-blob phantom;
    :attr:`segment_dice`, :attr:`point_tolerance_mm`) leave a margin over what was measured headless with
    ``grad_mr_gated`` after the affine pre-alignment: Dice 0.735 -> 0.966 (Body 0.961, Core 0.946), points
    within 0.52 mm."""

    logicClass = GradRegistrationLogic
    test_options = {}
    segment_dice = 0.9
    point_tolerance_mm = 1.5
    #: The known-shift model's transform versus the phantom's translation (mm, per coordinate).
    known_shift_tolerance_mm = 0.05

    def runTest(self):
        """Run every check, each on a fresh scene."""
        for check in (self.test_MethodStatus, self.test_BadInput, self.test_Registration, self.test_KnownShiftModel,
                      self.test_NoGatesModel, self.test_Models, self.test_Cancel, self.test_ParameterNodeRoundTrip):
            self.setUp()
            check()

    @contextlib.contextmanager
    def _test_models(self):
        """Two constant-field models in a temporary user model folder (the user's own models are hidden meanwhile):
        "grad_selftest_gated" (gated, field = the phantom's translation, image gate ~1, gradient gate ~0) and
        "grad_selftest_vm" (VM, the same field)."""
        import tempfile

        import numpy as np

        from MMRegCommonLib.testing import TRANSLATION_LPS
        # The phantom's fixed grid is axis-aligned (the network grid shares its direction): the translation in
        # network voxels, tensor order (z, y, x).
        shift = (np.asarray(TRANSLATION_LPS)[::-1] / TEST_MODEL_SPACING).tolist()
        with tempfile.TemporaryDirectory(prefix="mmreg-selftest-") as root:
            save_constant_model(os.path.join(root, METHOD, "grad_selftest_gated"), shift, "gated",
                                description="Constant-field MR-MR test model (gated).")
            save_constant_model(os.path.join(root, METHOD, "grad_selftest_vm"), shift, "vm",
                                description="Constant-field MR-MR test model (VM).")
            with user_models(root):
                yield root

    def test_KnownShiftModel(self):
        """A gated constant-field model whose field is the phantom's translation, from the parameter node with gate
        maps: the transform maps fixed points to the moving ones (RAS), Dice per segment, the gate volumes (names,
        fixed grid, image gate ~1, gradient gate ~0, 0..1 window); the moving voxels unchanged; the selector's label."""
        import numpy as np
        import SimpleITK as sitk

        from GradRegistrationLib.options import model_items
        from MMRegCommonLib.testing import BODY_CENTER, CORE_CENTER, F, TRANSLATION_LPS, make_synthetic_pair
        with self._test_models():
            logic = self._logic()
            labels = dict((value, label) for value, label, _ in model_items(logic.method_status()))
            # (" — default" follows the label of the default model: one of these when no grad model is shipped)
            self.assertTrue(labels["grad_selftest_gated"].startswith("grad_selftest_gated (gated fusion, MR-MR) "
                                                                     "(fine-tuned)"), labels)
            self.assertTrue(labels["grad_selftest_vm"].startswith("grad_selftest_vm (VM, MR-MR) (fine-tuned)"), labels)
            case = make_synthetic_pair(slicer.mrmlScene)
            moving_voxels = slicer.util.arrayFromVolume(case["moving"]).copy()
            p = logic.getParameterNode()
            p.fixedVolume, p.movingVolume = case["fixed"], case["moving"]
            p.movingSegmentation, p.fixedSegmentation = case["moving_seg"], case["fixed_seg"]
            p.model, p.affine, p.refinementSteps, p.makeGateMaps = "grad_selftest_gated", False, 0, True
            outcome = logic.run_with_parameters(p)
        self.assertEqual(outcome.report["options"]["model"], "grad_selftest_gated")
        errors = []
        for point in (BODY_CENTER, CORE_CENTER, BODY_CENTER + np.array([-15.0, 10.0, 5.0])):
            mapped = np.array(outcome.transform_node.GetTransformFromParent().TransformPoint(list(F @ point)))
            errors.append(float(np.abs(mapped - F @ (point + TRANSLATION_LPS)).max()))
        self.assertLess(max(errors), self.known_shift_tolerance_mm, errors)
        summary = outcome.summary()
        self.assertTrue(all(after > 0.9 for _, _, after in summary["dice"]), summary["dice"])
        self.assertEqual(summary["folding_percent"], 0.0)
        gates = {name: outcome.extra_nodes[name] for name in GATE_MAP_NAMES}
        self.assertEqual([n.GetName() for n in gates.values()], ["Phantom moving image gate",
                                                                  "Phantom moving gradient gate"])
        self.assertIs(p.outputImageGate, gates["image_gate"])
        self.assertIs(p.outputGradientGate, gates["gradient_gate"])
        fixed_shape = slicer.util.arrayFromVolume(case["fixed"]).shape
        values = {name: slicer.util.arrayFromVolume(node) for name, node in gates.items()}
        for name, array in values.items():
            self.assertEqual(array.shape, fixed_shape)
            np.testing.assert_allclose(array, sitk.GetArrayFromImage(outcome.result.extra_images[name]), atol=1e-6)
            display = gates[name].GetDisplayNode()
            self.assertEqual((display.GetWindowLevelMin(), display.GetWindowLevelMax()), (0.0, 1.0))
        self.assertGreater(float(values["image_gate"].min()), 0.99)
        self.assertLess(float(values["gradient_gate"].max()), 0.01)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(case["moving"]), moving_voxels)
        self.assertIs(case["moving"].GetParentTransformNode(), outcome.transform_node)
        self.delayDisplay(f"Known-shift model: fixed points mapped within {max(errors):.4f} mm; Dice "
                          + ", ".join(f"{n} {a:.3f} -> {b:.3f}" for n, a, b in summary["dice"])
                          + f"; image gate {values['image_gate'].min():.4f}..{values['image_gate'].max():.4f}, "
                          f"gradient gate {values['gradient_gate'].min():.4f}..{values['gradient_gate'].max():.4f}")

    def test_NoGatesModel(self):
        """A VM model with gate maps asked for (the parameter node, with chosen output volumes): the registration runs,
        no gate volume is made or changed, and the notes say that gate maps are only available for gated models; the
        panel's controls say the same."""
        import numpy as np

        from MMRegCommonLib.testing import F, TRANSLATION_LPS, make_synthetic_pair
        with self._test_models():
            logic = self._logic()
            case = make_synthetic_pair(slicer.mrmlScene)
            chosen = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "My gate")
            p = logic.getParameterNode()
            p.fixedVolume, p.movingVolume, p.affine, p.model = case["fixed"], case["moving"], False, "grad_selftest_vm"
            p.refinementSteps = 0  # the network's known shift alone
            p.makeGateMaps, p.outputGradientGate = True, chosen
            states = METHOD_OPTIONS.control_states(METHOD_OPTIONS.values(p), logic.method_status())
            info = METHOD_OPTIONS.info_text(METHOD_OPTIONS.values(p), logic.method_status())
            before = slicer.mrmlScene.GetNumberOfNodes()
            outcome = logic.run_with_parameters(p)
        self.assertEqual(states["makeGateMaps"][0], False)
        self.assertIn("only available for gated models", states["makeGateMaps"][1])
        self.assertIn("Gate maps are only available for gated models.", info)
        self.assertEqual(outcome.extra_nodes, {})
        self.assertIn(
            "Gate maps are only available for gated models: 'grad_selftest_vm' is a VM model (no gates), so no gate "
            "volumes were made.", outcome.notes)
        self.assertIn("only available for gated models", outcome.summary_text())
        self.assertIs(p.outputGradientGate, chosen)
        self.assertIsNone(chosen.GetImageData())
        self.assertEqual(len(slicer.util.getNodes("*gate*")), 1)
        self.assertEqual(len(outcome.created_node_ids), 2)  # transform and warped volume
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), before)
        point = np.array([2.0, -3.0, 4.0])
        mapped = np.array(outcome.transform_node.GetTransformFromParent().TransformPoint(list(F @ point)))
        np.testing.assert_allclose(mapped, F @ (point + TRANSLATION_LPS), atol=self.known_shift_tolerance_mm)
        self.delayDisplay("VM model: registered, no gate volume, and the note: " + outcome.notes[-1])

    def test_Models(self):
        """Each shipped model is listed with its variant and modality pair (its card), runs by name on the phantom, and
        makes gate maps in (0, 1) exactly when it is gated."""
        import numpy as np

        from GradRegistrationLib.options import VARIANT_LABELS, model_items, model_modality, model_variant
        from MMRegCommonLib.testing import make_synthetic_pair
        status = self._logic().method_status()
        shipped = [m for m in status.models if (m.info or {}).get("source") == "shipped"]
        if not shipped:
            self.delayDisplay(f"No shipped '{METHOD}' model installed: model checks skipped")
            return
        labels = dict((value, label) for value, label, _ in model_items(status))
        case = make_synthetic_pair(slicer.mrmlScene)
        lines = []
        for choice in shipped:
            variant, modality = model_variant(choice), model_modality(choice)
            self.assertIn(variant, VARIANT_LABELS, choice.value)
            self.assertIn(modality, ("CT-MR", "MR-MR"), choice.value)
            self.assertTrue(labels[choice.value].startswith(f"{choice.value} ({VARIANT_LABELS[variant]}, {modality})"))
            outcome = self._logic().run(case["fixed"], case["moving"], case["moving_seg"], case["fixed_seg"],
                                        model=choice.value, affine=True, place_moving_under_transform=False)
            self.assertEqual(outcome.report["options"]["model"], choice.value)
            if variant == GATED:
                self.assertEqual(sorted(outcome.extra_nodes), sorted(GATE_MAP_NAMES))
                for node in outcome.extra_nodes.values():
                    array = slicer.util.arrayFromVolume(node)
                    # (sigmoid gates; a saturated one is exactly 0 or 1 in float32)
                    self.assertTrue(0.0 <= float(array.min()) and float(array.max()) <= 1.0, (array.min(), array.max()))
            else:
                self.assertEqual(outcome.extra_nodes, {})
                self.assertTrue(any("only available for gated models" in n for n in outcome.notes))
            summary = outcome.summary()
            gate = ""
            if variant == GATED:
                values = slicer.util.arrayFromVolume(outcome.extra_nodes["gradient_gate"])
                gate = f", gradient gate mean {float(np.mean(values)):.3f}"
            lines.append(f"{labels[choice.value]}: phantom Dice {summary['mean_dice_affine']:.3f} (affine) -> "
                         f"{summary['mean_dice']:.3f}{gate}, {summary['runtime_s']:.1f} s")
        self.delayDisplay("Models: " + "; ".join(lines))

    def test_ParameterNodeRoundTrip(self):
        """The shared parameters and the module's own come back after saving and reloading the scene."""
        from MMRegCommonLib.testing import reload_module_node
        RegistrationModuleTest.test_ParameterNodeRoundTrip(self)
        logic = self._logic()
        params = logic.getParameterNode()
        image_gate = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Image gate out")
        gradient_gate = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Gradient gate out")
        params.model, params.refineSimilarity, params.makeGateMaps = "grad_ctmr_gated", "mi", True
        params.outputImageGate, params.outputGradientGate = image_gate, gradient_gate
        reloaded, node = reload_module_node(slicer.mrmlScene, logic.moduleName)
        restored = logic.parameterNodeClass(node)
        self.assertEqual((restored.model, restored.refineSimilarity, restored.makeGateMaps,
                          restored.outputImageGate.GetName(), restored.outputGradientGate.GetName()),
                         ("grad_ctmr_gated", "mi", True, "Image gate out", "Gradient gate out"))
        self.delayDisplay("Module parameters round trip (model, refinement similarity, gate maps)")
