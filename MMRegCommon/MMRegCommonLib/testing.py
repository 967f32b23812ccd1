"""The self-test shared by the method modules (runs in Slicer's Self Tests and headless under pytest).

A module's test is a thin subclass::

    class MIRegistrationTest(RegistrationModuleTest):
        logicClass = MIRegistrationLogic

Inputs are made here, without downloads: a synthetic pair on different grids (moving = fixed
translated by a known vector) with a two-segment segmentation each. The checks are numeric:
Dice improves, outputs exist on the right grids, and the transform maps a fixed point to the
moving point the known translation predicts.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import SimpleITK as sitk
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

F = np.diag([-1.0, -1.0, 1.0])
#: Known translation of the synthetic pair, LPS mm: moving(x + T) = fixed(x).
TRANSLATION_LPS = np.array([6.0, -4.0, 5.0])
#: Blob centres (LPS mm) of the fixed image: "Body" (ellipsoid) and "Core" (sphere).
BODY_CENTER = np.array([2.0, -3.0, 4.0])
CORE_CENTER = BODY_CENTER + np.array([8.0, 6.0, -4.0])


def _grid(size, spacing, origin, rotation_deg=0.0) -> sitk.Image:
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    angle = np.deg2rad(rotation_deg)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection(tuple(direction.ravel()))
    return image


def _phantom(grid: sitk.Image, shift) -> tuple:
    """Intensity image and label map (1 Body, 2 Core) of the phantom shifted by ``shift`` (LPS mm)."""
    size = grid.GetSize()
    kk, jj, ii = np.meshgrid(*[np.arange(n, dtype=float) for n in reversed(size)], indexing="ij")
    index = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
    d = np.array(grid.GetDirection()).reshape(3, 3) @ np.diag(grid.GetSpacing())
    points = index @ d.T + np.array(grid.GetOrigin()) - np.asarray(shift)
    body = np.sum(((points - BODY_CENTER) / np.array([30.0, 24.0, 20.0])) ** 2, axis=1)
    core = np.sum(((points - CORE_CENTER) / 9.0) ** 2, axis=1)
    def inside(r2):  # 1 inside, 0 outside, a smooth edge of about a millimetre
        return 1.0 / (1.0 + np.exp(np.clip((r2 - 1.0) * 12.0, -50.0, 50.0)))

    intensity = 40.0 * inside(body) + 80.0 * inside(core)
    intensity += 10.0 * np.sin(points[:, 0] / 7.0) * (body < 1)  # texture, so the fit is not flat inside
    labels = np.where(core <= 1, 2, np.where(body <= 1, 1, 0)).astype(np.uint8)
    shape = tuple(reversed(size))
    image = sitk.GetImageFromArray(intensity.reshape(shape).astype(np.float32))
    image.CopyInformation(grid)
    label_image = sitk.GetImageFromArray(labels.reshape(shape))
    label_image.CopyInformation(grid)
    return image, label_image


def make_synthetic_pair(scene) -> dict:
    """Fixed/moving volume and segmentation nodes of the phantom; moving = fixed translated by TRANSLATION_LPS.

    The grids differ (size, spacing, origin; the moving one rotated 10 degrees about z).
    The fixed segmentation lists its segments in the other order than the moving one, so
    scoring must match them by name. Returns the nodes and the SimpleITK label maps.
    """
    from mmreg_slicer import bridge
    fixed_grid = _grid((40, 36, 30), (2.5, 2.5, 3.0), (-45.0, -45.0, -40.0))
    moving_grid = _grid((44, 40, 32), (2.3, 2.3, 2.8), (-47.0, -50.0, -38.0), rotation_deg=10.0)
    fixed, fixed_labels = _phantom(fixed_grid, (0.0, 0.0, 0.0))
    moving, moving_labels = _phantom(moving_grid, TRANSLATION_LPS)
    info = {1: {"name": "Body", "color": (0.9, 0.7, 0.5)}, 2: {"name": "Core", "color": (0.2, 0.6, 0.9)}}
    swapped = sitk.ChangeLabel(fixed_labels, {1: 2, 2: 1})
    return {
        "fixed": bridge.volume_node_from_image(fixed, scene, "Phantom fixed"),
        "moving": bridge.volume_node_from_image(moving, scene, "Phantom moving"),
        "moving_seg": bridge.segmentation_node_from_labelmap_image(moving_labels, scene, "Phantom moving segments", info),
        "fixed_seg": bridge.segmentation_node_from_labelmap_image(
            swapped, scene, "Phantom fixed segments", {1: info[2], 2: info[1]}),
        "fixed_labels": fixed_labels, "moving_labels": moving_labels,
    }


def make_phantom_nodes(scene, name: str, shift=(0.0, 0.0, 0.0), size=(32, 32, 32), spacing=(4.0, 4.0, 4.0),
                       origin=(-62.0, -62.0, -62.0), rotation_deg: float = 0.0) -> tuple:
    """A phantom volume and its two-segment segmentation ("Body", "Core") shifted by ``shift`` (LPS mm),
    on a grid of ``size`` voxels of ``spacing`` mm from ``origin`` (LPS), rotated about z by
    ``rotation_deg``. Returns ``(volume node, segmentation node, label image)``; small defaults
    (32^3 voxels of 4 mm) for quick training runs."""
    from mmreg_slicer import bridge
    image, labels = _phantom(_grid(size, spacing, origin, rotation_deg), shift)
    info = {1: {"name": "Body", "color": (0.9, 0.7, 0.5)}, 2: {"name": "Core", "color": (0.2, 0.6, 0.9)}}
    volume = bridge.volume_node_from_image(image, scene, name)
    segmentation = bridge.segmentation_node_from_labelmap_image(labels, scene, f"{name} segments", info)
    return volume, segmentation, labels


#: Segments of the demo sample's label maps (Resources/Sample/LICENSE.md): 1 grey matter, 2 white matter.
SAMPLE_SEGMENTS = {1: {"name": "Grey matter", "color": (0.55, 0.55, 0.85)},
                   2: {"name": "White matter", "color": (0.95, 0.9, 0.7)}}


def sample_folder():
    """The demo sample's folder (``Resources/Sample`` beside the engine, as for the shipped models: in the
    repository and in the extension), or None when it is not there."""
    from pathlib import Path

    import mmreg
    folder = Path(mmreg.__file__).resolve().parents[1] / "Resources" / "Sample"
    names = ("fixed.nii.gz", "moving.nii.gz", "fixed_labels.nii.gz", "moving_labels.nii.gz")
    return folder if all((folder / name).is_file() for name in names) else None


def load_brain_sample(scene) -> dict | None:
    """The demo sample as nodes: "Sample MNI152" (fixed, the MNI ICBM152 2009a T1 template at 2 mm) and "Sample
    Colin27" (moving, the Colin27 T1 with a rotated and shifted header), each with a grey/white matter
    segmentation (:data:`SAMPLE_SEGMENTS`; rough automatic labels, see the sample's LICENSE.md). Returns
    ``{"fixed", "moving", "fixed_seg", "moving_seg", "fixed_labels", "moving_labels"}`` (label maps as
    SimpleITK images, LPS), or None when the sample is not installed."""
    from mmreg_slicer import bridge
    folder = sample_folder()
    if folder is None:
        return None
    read = {name: sitk.ReadImage(str(folder / f"{name}.nii.gz")) for name in
            ("fixed", "moving", "fixed_labels", "moving_labels")}
    return {
        "fixed": bridge.volume_node_from_image(sitk.Cast(read["fixed"], sitk.sitkFloat32), scene, "Sample MNI152"),
        "moving": bridge.volume_node_from_image(sitk.Cast(read["moving"], sitk.sitkFloat32), scene, "Sample Colin27"),
        "fixed_seg": bridge.segmentation_node_from_labelmap_image(read["fixed_labels"], scene, "Sample MNI152 tissues",
                                                                  SAMPLE_SEGMENTS),
        "moving_seg": bridge.segmentation_node_from_labelmap_image(read["moving_labels"], scene,
                                                                   "Sample Colin27 tissues", SAMPLE_SEGMENTS),
        "fixed_labels": read["fixed_labels"], "moving_labels": read["moving_labels"],
    }


@contextlib.contextmanager
def user_models(folder):
    """Within the block the engine's user model folder (``$MMREG_MODELS``) is ``folder`` (a self-test's own test
    models, the user's models hidden meanwhile); restored afterwards."""
    before = os.environ.get("MMREG_MODELS")
    os.environ["MMREG_MODELS"] = str(folder)
    try:
        yield folder
    finally:
        if before is None:
            os.environ.pop("MMREG_MODELS", None)
        else:
            os.environ["MMREG_MODELS"] = before


def set_constant_output(network, values) -> None:
    """Make ``network`` (a torch module whose LAST convolution makes its output, e.g. a registration U-Net or an
    image generator) output the constant ``values`` per channel, whatever its input: that convolution's weights
    become 0 and its bias ``values``. For test models with exactly known outputs (no training)."""
    import torch
    last = [m for m in network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([float(v) for v in values], dtype=last.bias.dtype))


def reload_module_node(scene, module_name: str):
    """``(new_scene, node)``: the parameter node of ``module_name`` as it comes back after saving
    ``scene`` to XML and importing that into a new scene (what saving and reopening a scene does
    to it). Keep ``new_scene`` while using the node: its node references live there."""
    scene.SetSaveToXMLString(1)
    try:
        scene.Commit()
        xml = scene.GetSceneXMLString()
    finally:
        scene.SetSaveToXMLString(0)
    reloaded = slicer.vtkMRMLScene()
    reloaded.SetLoadFromXMLString(1)
    reloaded.SetSceneXMLString(xml)
    reloaded.Import()
    nodes = [reloaded.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
             for i in range(reloaded.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode"))]
    return reloaded, next(n for n in nodes if n.GetAttribute("ModuleName") == module_name)


def node_ids(scene) -> set:
    """The IDs of every node in ``scene`` (to check that a run added or left exactly the nodes it should)."""
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def oblique_volume(scene, name: str, seed: int = 0) -> tuple:
    """A noise volume (values 0-100) on an oblique (25 deg about z, then 15 deg about x), anisotropic
    (2.2 x 3.1 x 3.7 mm) 30 x 26 x 22 grid, as a volume node named ``name`` in ``scene``; returns
    ``(node, SimpleITK image)`` (the image in LPS, as the engine reads it)."""
    from mmreg_slicer import bridge
    image = sitk.GetImageFromArray(np.random.default_rng(seed).random((22, 26, 30)).astype(np.float32) * 100.0)
    image.SetSpacing((2.2, 3.1, 3.7))
    image.SetOrigin((-30.0, 20.0, -40.0))
    a, b = np.deg2rad(25.0), np.deg2rad(15.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    image.SetDirection(tuple((rz @ rx).ravel()))
    return bridge.volume_node_from_image(image, scene, name), image


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (the engine's :func:`mmreg.metrics.dice_per_label`; 0 when both are empty)."""
    from mmreg.metrics import dice_per_label
    return dice_per_label(np.asarray(a, np.uint8), np.asarray(b, np.uint8), [1]).get(1, 0.0)


class RegistrationModuleTest(ScriptedLoadableModuleTest):
    """Self-test of a method module; subclasses set :attr:`logicClass`.

    The registration checks run the module's own method (a learned one with its default
    model) through the Logic. Where it cannot run (missing from the engine, or no trained model
    installed) they run :attr:`fallback_method` ("optimize": the engine's instance
    optimisation, real and fast on the small phantom) through the same Logic, and
    :meth:`test_MethodStatus` checks that the module says why its own method is unavailable.
    """

    logicClass = None
    #: Engine method and options of the registration checks; None: the module's own method.
    test_method = None
    test_options = {}
    #: Used instead when the module's own method cannot run here (few steps: a few seconds).
    fallback_method = "optimize"
    fallback_options = {"levels": 1, "iterations": [25]}
    #: Thresholds of :meth:`test_Registration`: whole-phantom Dice, each segment's Dice, and the largest error (mm, per
    #: coordinate) of fixed points mapped through the transform. A module whose shipped network was trained on
    #: other images than this phantom (e.g. brains) sets looser ones, with the numbers measured in its docstring.
    registration_dice = 0.93
    segment_dice = 0.85
    point_tolerance_mm = 1.5

    def setUp(self):
        """Start from an empty scene (with the subject hierarchy, which Slicer's scene always has)."""
        slicer.mrmlScene.Clear(0)
        slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(slicer.mrmlScene)

    def runTest(self):
        """Run every check, each on a fresh scene."""
        for check in (self.test_MethodStatus, self.test_BadInput, self.test_Registration, self.test_Cancel,
                      self.test_ParameterNodeRoundTrip):
            self.setUp()
            check()

    def _logic(self):
        return self.logicClass()

    def registration_method(self) -> tuple:
        """``(method, options)`` of the registration checks (see :attr:`test_method`)."""
        if self.test_method:
            return self.test_method, dict(self.test_options)
        logic = self._logic()
        if logic.method_status().available:
            return logic.method_name, dict(self.test_options)
        return self.fallback_method, dict(self.fallback_options)

    def test_MethodStatus(self):
        """The module's method: usable when the engine has it, else a clear 'not available' state."""
        import mmreg
        logic = self._logic()
        status = logic.method_status()
        if status.available:
            self.assertIn(logic.method_name, mmreg.method_names())
        else:  # missing from the engine, or a learned method without a trained model: a clear reason, no run
            expected = ("has no trained model yet" if logic.method_name in mmreg.method_names()
                        else f"'{logic.method_name}' is not available")
            self.assertIn(expected, status.reason)
            case = make_synthetic_pair(slicer.mrmlScene)
            with self.assertRaisesRegex(mmreg.InputError, expected):
                logic.run(case["fixed"], case["moving"])
        self.delayDisplay("Method status checked")

    def test_BadInput(self):
        """Readable errors, and nothing added to the scene."""
        import mmreg
        case = make_synthetic_pair(slicer.mrmlScene)
        logic = self._logic()
        method, _ = self.registration_method()
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaisesRegex(mmreg.InputError, "two different volumes"):
            logic.run(case["fixed"], case["fixed"], method=method)
        empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Empty")
        with self.assertRaisesRegex(mmreg.InputError, "has no voxels"):
            logic.run(case["fixed"], empty, method=method)
        slicer.mrmlScene.RemoveNode(empty)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.delayDisplay("Bad input gives readable errors")

    def test_Registration(self):
        """Dice improves, outputs exist on the fixed grid, the transform points fixed -> moving."""
        from mmreg_slicer import bridge
        case = make_synthetic_pair(slicer.mrmlScene)
        fixed_labels = sitk.GetArrayFromImage(case["fixed_labels"])
        identity = sitk.Resample(case["moving_labels"], case["fixed_labels"], sitk.Transform(),
                                 sitk.sitkNearestNeighbor, 0)
        dice_before = dice(sitk.GetArrayFromImage(identity) > 0, fixed_labels > 0)

        method, options = self.registration_method()
        outcome = self._logic().run(case["fixed"], case["moving"], case["moving_seg"], case["fixed_seg"],
                                    method=method, **options)
        # Outputs: a grid transform, a volume and a segmentation on the fixed grid; moving under the transform.
        self.assertTrue(outcome.transform_node.IsA("vtkMRMLGridTransformNode"))
        self.assertEqual(case["moving"].GetParentTransformNode(), outcome.transform_node)
        warped = bridge.image_from_volume_node(outcome.volume_node)
        self.assertEqual(warped.GetSize(), case["fixed_labels"].GetSize())
        names = {outcome.segmentation_node.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(outcome.segmentation_node.GetSegmentation().GetNumberOfSegments())}
        self.assertEqual(names, {"Body", "Core"})

        # Dice of the whole phantom and per segment (matched by name although numbered differently).
        warped_labels, _ = bridge.segmentation_to_labelmap_image(outcome.segmentation_node, case["fixed"])
        dice_after = dice(sitk.GetArrayFromImage(warped_labels) > 0, fixed_labels > 0)
        self.assertLess(dice_before, 0.85)
        self.assertGreater(dice_after, self.registration_dice)
        summary = outcome.summary()
        self.assertEqual({name for name, _, _ in summary["dice"]}, {"Body", "Core"})
        self.assertTrue(all(after > self.segment_dice for _, _, after in summary["dice"]), summary["dice"])
        self.assertLess(summary["folding_percent"], 0.5)

        # Direction: FromParent maps a fixed RAS point p to the moving point p + T (RAS).
        errors = []
        for point_lps in (BODY_CENTER, CORE_CENTER, BODY_CENTER + np.array([-15.0, 10.0, 5.0])):
            mapped = np.array(outcome.transform_node.GetTransformFromParent().TransformPoint(list(F @ point_lps)))
            np.testing.assert_allclose(mapped, F @ (point_lps + TRANSLATION_LPS), atol=self.point_tolerance_mm)
            errors.append(float(np.abs(mapped - F @ (point_lps + TRANSLATION_LPS)).max()))
        self.delayDisplay(f"Registration ({method}): Dice {dice_before:.3f} -> {dice_after:.3f} ("
                          + ", ".join(f"{name} {after:.3f}" for name, _, after in summary["dice"])
                          + f"); points within {max(errors):.2f} mm")

    def test_Cancel(self):
        """Cancel during the run: CancelledError, the scene and the inputs exactly as before."""
        import mmreg
        case = make_synthetic_pair(slicer.mrmlScene)
        scene = slicer.mrmlScene
        before = node_ids(scene)
        logic = self._logic()
        seen = []

        def progress(fraction, message):
            seen.append(fraction)
            if fraction > 0.3:
                logic.cancel()  # what the Cancel button does

        method, options = self.registration_method()
        with self.assertRaises(mmreg.CancelledError):
            logic.run(case["fixed"], case["moving"], case["moving_seg"], case["fixed_seg"], method=method,
                      progress=progress, **options)
        after = node_ids(scene)
        self.assertEqual(after, before)
        self.assertIsNone(case["moving"].GetParentTransformNode())
        self.assertLess(max(seen), 0.9)
        self.assertFalse(logic.is_running)
        self.delayDisplay("Cancel leaves the scene unchanged")

    def test_ParameterNodeRoundTrip(self):
        """Parameters saved with the scene come back (values and node references)."""
        case = make_synthetic_pair(slicer.mrmlScene)
        logic = self._logic()
        params = logic.getParameterNode()
        params.fixedVolume, params.movingVolume = case["fixed"], case["moving"]
        params.movingSegmentation = case["moving_seg"]
        params.device, params.affine, params.refinementSteps, params.diffeomorphic = "cpu", False, 37, False
        reloaded, node = reload_module_node(slicer.mrmlScene, logic.moduleName)
        restored = logic.parameterNodeClass(node)
        self.assertEqual(restored.fixedVolume.GetName(), "Phantom fixed")
        self.assertEqual(restored.movingVolume.GetName(), "Phantom moving")
        self.assertEqual(restored.movingSegmentation.GetName(), "Phantom moving segments")
        self.assertIsNone(restored.fixedSegmentation)
        self.assertEqual((restored.device, restored.affine, restored.refinementSteps, restored.diffeomorphic),
                         ("cpu", False, 37, False))
        self.delayDisplay("Parameter node round trip")
