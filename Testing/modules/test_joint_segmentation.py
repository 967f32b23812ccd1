"""The joint registration-segmentation workflow of RegistrationTraining headless (slicer-core), with real runs.

Phantoms: two nested ellipsoids ("Body" about 900 voxels, "Core" about 50 voxels) on 32^3 grids of 4 mm
(:func:`MMRegCommonLib.testing.make_phantom_nodes`), shifted by a few millimetres from one copy to the next.
The engine runs as ``mmreg joint-seg`` in a child process (one CPU thread), propagating with the shipped
``multiscale`` model without refinement, at a 4 mm segmentation grid.
"""
from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import mmreg
from MMRegCommonLib.testing import node_ids

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

#: Annotated and unannotated phantoms (LPS shifts in mm), and the unseen one segmented at the end.
ANNOTATED_SHIFTS = [(0.0, 0.0, 0.0), (5.0, -4.0, 3.0)]
UNANNOTATED_SHIFTS = [(-4.0, 5.0, -3.0), (6.0, 3.0, -5.0)]
UNSEEN_SHIFT = (-3.0, -5.0, 4.0)
#: Segmentation steps of the real run (about 25 s in all on one CPU thread, most of it the training).
STEPS = 120
FAST = {"spacing": 4.0, "threads": 1, "options": {"refinement_steps": 0}}


@pytest.fixture
def module(tmp_path, monkeypatch):
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("MMREG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MMREG_THREADS", "1")
    return importlib.import_module("RegistrationTraining")


def phantoms(scene, shifts, prefix):
    from MMRegCommonLib.testing import make_phantom_nodes
    return [make_phantom_nodes(scene, f"{prefix} {i + 1}", shift=shift) for i, shift in enumerate(shifts)]


def arrays(nodes):
    import slicer
    return [slicer.util.arrayFromVolume(n).copy() for n in nodes]


def test_joint_segmentation_trains_from_the_scene_and_segments_an_unseen_phantom(module, scene, tmp_path):
    from mmreg.segmentation import dice_per_label
    from mmreg_slicer import bridge
    logic = module.RegistrationTrainingLogic()
    annotated = phantoms(scene, ANNOTATED_SHIFTS, "Annotated")
    unannotated = phantoms(scene, UNANNOTATED_SHIFTS, "Unannotated")
    unseen, unseen_seg, truth = phantoms(scene, [UNSEEN_SHIFT], "Unseen")[0]
    volumes = [v for v, _, _ in annotated + unannotated]
    before = arrays(volumes)
    segments_before = [seg.GetSegmentation().GetNumberOfSegments() for _, seg, _ in annotated]

    ids = node_ids(scene)
    t0 = time.perf_counter()
    run = logic.start_joint_segmentation([(v, s) for v, s, _ in annotated], [v for v, _, _ in unannotated],
                                         "phantom_segmenter", steps=STEPS, test=[(unseen, unseen_seg)], **FAST)
    events = []
    assert run.wait(timeout=400, interval=0.1, on_events=events.extend) == 0, run.console_text()
    seconds = time.perf_counter() - t0
    assert run.state == "done" and run.fraction == 1.0, run.status_text()
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    messages = " ".join(e["message"] for e in events)
    assert "registering" in messages and f"segmentation step {STEPS}/{STEPS}" in messages
    folder = logic.segmenter_folder("phantom_segmenter")
    assert folder == Path(os.environ["MMREG_MODELS"]) / "segmenters" / "phantom_segmenter"
    card = json.loads((folder / "segmenter.json").read_text())
    assert card["label_ids"] == [1, 2] and card["spacing_mm"] == 4.0
    assert json.loads((folder / "labels.json").read_text()) == {"1": "Body", "2": "Core"}
    assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name]
    # Inputs untouched; the scene got no node from the run itself.
    for a, b in zip(before, arrays(volumes)):
        np.testing.assert_array_equal(a, b)
    assert [seg.GetSegmentation().GetNumberOfSegments() for _, seg, _ in annotated] == segments_before
    assert node_ids(scene) == ids

    # The held-out score the engine printed: mean over Body and Core (measured about 0.46: Body 0.93, Core 0).
    assert 0.4 < run.held_out_dice < 1.0 and "held-out mean Dice" in run.status_text(), run.status_text()

    # Segmenting an unseen shifted phantom gives a new segmentation node, segments named as trained.
    ids = node_ids(scene)
    node = logic.segment_volume(unseen, "phantom_segmenter")
    new = [scene.GetNodeByID(i) for i in node_ids(scene) - ids]  # the segmentation and its display node only
    assert node in new and all(n is node or n.IsA("vtkMRMLDisplayNode") for n in new), [n.GetName() for n in new]
    assert node.IsA("vtkMRMLSegmentationNode") and node.GetName() == "Unseen 1 segmentation"
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == [
        "Body", "Core"]
    labels, info = bridge.segmentation_to_labelmap_image(node, unseen)
    by_name = {entry["name"]: value for value, entry in info.items()}
    predicted = sitk.GetArrayFromImage(labels)
    truth_array = sitk.GetArrayFromImage(truth)
    body = 2.0 * np.sum((predicted == by_name["Body"]) & (truth_array == 1)) / (
        np.sum(predicted == by_name["Body"]) + np.sum(truth_array == 1))
    baseline = dice_per_label(truth, annotated[0][2], [1])[1]  # the first annotated phantom's labels as they are
    print(f"joint segmentation: {seconds:.1f} s; Body Dice {body:.3f} (unregistered atlas labels {baseline:.3f})")
    # Measured on the CI machine (120 steps, one thread): Body Dice about 0.93, the atlas labels as they lie 0.75.
    # The 50-voxel Core is not learned at this budget (Dice 0 at 120 steps); it is only checked to be listed.
    assert body > 0.85 and body > baseline + 0.05, (body, baseline)
    assert seconds < 300


def test_a_stopped_run_writes_no_segmenter_and_says_stopped(module, scene):
    logic = module.RegistrationTrainingLogic()
    annotated = phantoms(scene, ANNOTATED_SHIFTS[:1], "Annotated")
    unannotated = phantoms(scene, UNANNOTATED_SHIFTS[:1], "Unannotated")
    run = logic.start_joint_segmentation([(v, s) for v, s, _ in annotated], [v for v, _, _ in unannotated],
                                         "stopped_segmenter", steps=100000, **FAST)
    seen = []

    def stop_in_training(events):
        seen.extend(events)
        if any("segmentation step" in e["message"] for e in events):
            logic.stop_joint()

    assert logic.joint_running
    assert run.wait(timeout=300, interval=0.1, on_events=stop_in_training) == 130, run.console_text()
    assert run.state == "stopped" and "nothing was written" in run.status_text()
    assert not logic.joint_running
    assert not (run.work_folder / "data").exists() and run.console_path.is_file()  # exported copies removed
    folder = logic.segmenter_folder("stopped_segmenter")
    assert not folder.exists()
    assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name]
    assert seen and seen[-1]["fraction"] < 0.5  # it stopped early in the 100000 steps, not at their end
    with pytest.raises(mmreg.InputError, match="is neither a folder nor the name"):
        logic.segment_volume(annotated[0][0], "stopped_segmenter")


def test_terminate_ends_the_run_at_once_and_leaves_nothing(module, scene):
    logic = module.RegistrationTrainingLogic()
    annotated = phantoms(scene, ANNOTATED_SHIFTS[:1], "Annotated")
    unannotated = phantoms(scene, UNANNOTATED_SHIFTS[:1], "Unannotated")
    run = logic.start_joint_segmentation([(v, s) for v, s, _ in annotated], [v for v, _, _ in unannotated],
                                         "terminated_segmenter", steps=100000, **FAST)

    def terminate_at_first_report(events):
        run.terminate()

    assert run.wait(timeout=300, interval=0.1, on_events=terminate_at_first_report) == 130, run.console_text()
    assert run.state == "stopped"
    folder = logic.segmenter_folder("terminated_segmenter")
    assert not folder.exists() and not [p for p in folder.parent.iterdir() if ".partial-" in p.name]


def test_bad_input_gives_a_clear_message_and_adds_no_nodes(module, scene, tmp_path):
    from mmreg_slicer import bridge
    logic = module.RegistrationTrainingLogic()
    (volume, seg, labels), (other, other_seg, _) = phantoms(scene, ANNOTATED_SHIFTS, "Annotated")
    (target, _, _), = phantoms(scene, UNANNOTATED_SHIFTS[:1], "Unannotated")
    labelmap = bridge.volume_node_from_image(labels, scene, "Annotated 1 labelmap", labelmap=True)
    # A segmentation drawn on an image far away: nothing of it lies inside the volume.
    from MMRegCommonLib.testing import make_phantom_nodes
    _, far_seg, _ = make_phantom_nodes(scene, "Far", origin=(400.0, 400.0, 400.0))
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Empty")
    ids = node_ids(scene)
    start = logic.start_joint_segmentation
    cases = [
        (lambda: start([], [target], "x"), "No annotated volume"),
        (lambda: start([(volume, seg)], [], "x"), "No unannotated volume"),
        (lambda: start([(volume, None)], [target], "x"), "select its segmentation or labelmap"),
        (lambda: start([(labelmap, seg)], [target], "x"), "must be a scalar volume"),
        (lambda: start([(volume, other)], [target], "x"), "must be a segmentation or a labelmap"),
        (lambda: start([(volume, far_seg)], [target], "x"), "has no label inside the volume 'Annotated 1'"),
        (lambda: start([(volume, empty)], [target], "x"), "has no label inside"),
        (lambda: start([(volume, seg)], [volume], "x"), "both an annotated and an unannotated"),
        (lambda: start([(volume, seg)], [target], "../escape"), "not usable as a folder name"),
        (lambda: start([(volume, seg)], [target], "x", steps=0), "steps must be"),
        (lambda: start([(volume, seg)], [target], "x", method=""), "registration method"),
        (lambda: logic.segment_volume(None, "x"), "Choose the volume"),
        (lambda: logic.segment_volume(volume, ""), "Choose the segmenter"),
        (lambda: logic.segment_volume(labelmap, "x"), "must be a scalar volume"),
    ]
    for action, message in cases:
        with pytest.raises(mmreg.InputError, match=message):
            action()
    existing = logic.segmenter_folder("taken")
    existing.mkdir(parents=True)
    with pytest.raises(mmreg.InputError, match="already exists"):
        start([(volume, seg)], [target], "taken")
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(mmreg.WeightsError, match="segmenter.json"):
        logic.segment_volume(volume, str(broken))
    assert node_ids(scene) == ids
    assert logic.joint_run is None


def test_a_labelmap_volume_works_as_annotation_and_a_failed_run_reports_the_engine_error(module, scene):
    logic = module.RegistrationTrainingLogic()
    from mmreg_slicer import bridge
    (volume, _, labels), = phantoms(scene, ANNOTATED_SHIFTS[:1], "Annotated")
    (target, _, _), = phantoms(scene, UNANNOTATED_SHIFTS[:1], "Unannotated")
    labelmap = bridge.volume_node_from_image(labels, scene, "labelmap", labelmap=True)
    run = logic.start_joint_segmentation([(volume, labelmap)], [target], "failing", method="no_such_method",
                                         steps=1, spacing=4.0, threads=1)
    assert run.wait(timeout=120, interval=0.1) == 2
    assert run.state == "error" and "no_such_method" in run.error_message(), run.console_text()
    assert "--labels" in run.command and run.command[run.command.index("--labels") + 1] == "all"
    assert not logic.segmenter_folder("failing").exists()


def test_annotated_volumes_are_kept_in_the_parameter_node(module, scene):
    logic = module.RegistrationTrainingLogic()
    (v1, s1, _), (v2, s2, _) = phantoms(scene, ANNOTATED_SHIFTS, "Annotated")
    params = logic.getParameterNode()
    logic.add_joint_annotated(params, v1, s1)
    logic.add_joint_annotated(params, v2, s2)
    assert [(a.volume.GetName(), a.labels.GetName()) for a in logic.joint_annotated(params)] == [
        ("Annotated 1", "Annotated 1 segments"), ("Annotated 2", "Annotated 2 segments")]
    with pytest.raises(mmreg.InputError, match="select its segmentation"):
        logic.add_joint_annotated(params, v1, None)
    logic.remove_joint_annotated(params, 0)
    assert [a.volume.GetName() for a in logic.joint_annotated(params)] == ["Annotated 2"]
    assert params.jointMethod == "multiscale" and params.jointSteps == 400
    from MMRegCommonLib.testing import reload_module_node
    _, node = reload_module_node(scene, "RegistrationTraining")
    assert [a.volume.GetName() for a in logic.joint_annotated(node)] == ["Annotated 2"]


def test_the_panel_section_is_collapsed_by_default_and_binds_the_joint_parameters():
    import xml.etree.ElementTree as ET
    path = Path(__file__).resolve().parents[2] / "RegistrationTraining" / "Resources" / "UI" / "RegistrationTraining.ui"
    root = ET.parse(path).getroot()
    section = next(w for w in root.iter("widget") if w.get("name") == "jointCollapsibleButton")
    props = {p.get("name"): p for p in section.findall("property")}
    assert props["text"].findtext("string") == "Joint registration-segmentation"
    assert props["collapsed"].findtext("bool") == "true"
    bound = {p.findtext("string") for w in section.iter("widget") for p in w.findall("property")
             if p.get("name") in ("SlicerParameterName", "MMRegNodeListParameterName")}
    assert bound == {"jointUnannotatedVolumes", "jointMethod", "jointModel", "jointSteps", "jointSpacing",
                     "jointSegmenterName", "jointOutputFolder", "segmentVolume", "segmenterPath"}
