"""The MIRegistration module headless: its Slicer self-test, and its Logic directly.

Registrations here use the engine's ``optimize`` method with few steps on a small synthetic
pair (seconds each): the module's own method ``mi`` is not in the engine yet, and the Logic
is the same for every method.
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np
import pytest

import mmreg
from MMRegCommonLib.testing import node_ids

QUICK = {"method": "optimize", "levels": 1, "iterations": [3]}


@pytest.fixture
def module():
    return importlib.import_module("MIRegistration")


def test_self_test_runs_headless(module, scene):
    """The same test class Slicer's Self Tests run: all its checks, via runTest()."""
    module.MIRegistrationTest().runTest()


def test_module_description(module):
    parent = SimpleNamespace()
    module.MIRegistration(parent)
    assert parent.title == "MI Registration (CNN)"
    assert parent.categories == ["Registration.Learning-based"]
    assert "mutual information" in parent.helpText and "--method mi" in parent.helpText


def test_mi_without_a_trained_model_is_reported(module, case, tmp_path, monkeypatch):
    # No model folders at all: the panel says why Apply is disabled and what to do.
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "user"))
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(tmp_path / "shipped"))
    logic = module.MIRegistrationLogic()
    status = logic.method_status()
    assert not status.available and not status.engine_missing
    if "mi" in mmreg.method_names():
        assert "has no trained model yet" in status.reason and "mmreg train" in status.reason
    else:
        assert "Method 'mi' is not available in this version" in status.reason
    from MMRegCommonLib import panel
    assert panel.apply_state(status, case["fixed"], case["moving"]) == (False, status.reason)


def test_chosen_output_nodes_are_filled_and_a_rerun_replaces_them(module, scene, case):
    logic = module.MIRegistrationLogic()
    out_t = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "My transform")
    out_v = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "My volume")
    out_s = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My segments")
    for _ in range(2):  # the second run starts with the moving volume under the first result
        before = node_ids(scene)
        outcome = logic.run(case["fixed"], case["moving"], case["moving_seg"], output_transform=out_t,
                            output_volume=out_v, output_segmentation=out_s, affine=True, **QUICK)
        assert (outcome.transform_node, outcome.volume_node, outcome.segmentation_node) == (out_t, out_v, out_s)
        assert outcome.created_node_ids == []
        assert node_ids(scene) - before <= {n.GetID() for n in (out_v.GetDisplayNode(), out_s.GetDisplayNode())}
        assert out_v.GetName() == "My volume" and out_v.GetImageData().GetDimensions() == (40, 36, 30)
        assert out_s.GetSegmentation().GetNumberOfSegments() == 2
        assert case["moving"].GetParentTransformNode() is out_t
    # The filled transform is the registration (fixed point -> moving point, known translation).
    from MMRegCommonLib.testing import BODY_CENTER, F, TRANSLATION_LPS
    mapped = np.array(out_t.GetTransformFromParent().TransformPoint(list(F @ BODY_CENTER)))
    np.testing.assert_allclose(mapped, F @ (BODY_CENTER + TRANSLATION_LPS), atol=2.0)


def test_failure_while_making_outputs_removes_them(module, scene, case, monkeypatch):
    from mmreg_slicer import bridge

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(bridge, "volume_node_from_image", broken)  # after the transform node was made
    before = node_ids(scene)
    with pytest.raises(RuntimeError, match="disk full"):
        module.MIRegistrationLogic().run(case["fixed"], case["moving"], case["moving_seg"], affine=False, **QUICK)
    assert node_ids(scene) == before
    assert case["moving"].GetParentTransformNode() is None


def test_readable_errors_for_bad_choices(module, scene, case):
    logic = module.MIRegistrationLogic()
    before = node_ids(scene)
    with pytest.raises(mmreg.InputError, match="Select the moving volume"):
        logic.run(case["fixed"], None, **QUICK)
    with pytest.raises(mmreg.InputError, match="has no option 'refinement_steps'"):
        logic.run(case["fixed"], case["moving"], refinement_steps=20, **QUICK)
    with pytest.raises(mmreg.InputError, match="must not be the fixed or the moving volume"):
        logic.run(case["fixed"], case["moving"], output_volume=case["moving"], **QUICK)
    with pytest.raises(mmreg.InputError, match="Unknown option"):
        logic.run(case["fixed"], case["moving"], not_an_option=1, **QUICK)
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    case["fixed"].SetAndObserveTransformNodeID(shift.GetID())
    with pytest.raises(mmreg.InputError, match="harden that transform"):
        logic.run(case["fixed"], case["moving"], **QUICK)
    case["fixed"].SetAndObserveTransformNodeID(None)
    scene.RemoveNode(shift)
    assert node_ids(scene) == before


def test_run_with_parameters_uses_the_parameter_node(module, scene, case):
    from MMRegCommonLib import panel
    logic = module.MIRegistrationLogic()
    params = logic.getParameterNode()
    params.fixedVolume, params.movingVolume = case["fixed"], case["moving"]
    params.movingSegmentation, params.fixedSegmentation = case["moving_seg"], case["fixed_seg"]
    params.device, params.affine, params.refinementSteps = "cpu", True, 50  # refinement: not an 'optimize' option
    params.placeMovingUnderTransform = False
    seen = []
    outcome = logic.run_with_parameters(params, progress=lambda f, m: seen.append(panel.progress_stage(m)),
                                        method="optimize", levels=1, iterations=[3])
    assert params.outputTransform is outcome.transform_node and params.outputVolume is outcome.volume_node
    assert params.outputSegmentation is outcome.segmentation_node
    assert case["moving"].GetParentTransformNode() is None
    assert outcome.report["device"] == "cpu" and outcome.report["options"]["diffeomorphic"] is True
    assert outcome.report["affine"] is not None
    assert "affine" in " ".join(seen) and len(set(seen)) < len(seen)  # stages repeat across steps
    summary = outcome.summary()
    assert [name for name, _, _ in summary["dice"]] == ["Body", "Core"]
    assert "Dice per segment" in outcome.summary_text() and summary["runtime_s"] > 0

    # After Apply the slice views show fixed (background) and warped (foreground, 50 %).
    views = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    outcome.segmentation_node.GetDisplayNode().SetVisibility(False)
    logic.show_outcome(outcome, params.fixedVolume)
    for view in views:
        assert view.GetBackgroundVolumeID() == case["fixed"].GetID()
        assert view.GetForegroundVolumeID() == outcome.volume_node.GetID()
        assert view.GetForegroundOpacity() == 0.5
    assert outcome.segmentation_node.GetDisplayNode().GetVisibility()


def test_unmatched_fixed_segments_are_reported(module, scene, case):
    segmentation = case["fixed_seg"].GetSegmentation()
    segmentation.GetSegment(segmentation.GetNthSegmentID(0)).SetName("Liver")
    outcome = module.MIRegistrationLogic().run(case["fixed"], case["moving"], case["moving_seg"], case["fixed_seg"],
                                               affine=False, **QUICK)
    assert any("Liver" in note for note in outcome.notes)
    assert [name for name, _, _ in outcome.summary()["dice"]] == ["Body"]
