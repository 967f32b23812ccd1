"""Headless module tests: Slicer's application framework pieces that slicer-core lacks, and the
module folders on ``sys.path`` (as Slicer puts its scripted-module folders there).

See :mod:`slicer_framework` for exactly what is supplied. Everything else is real: MRML from
``slicer-core``, the engine, the bridge and the modules' own code.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Folders of the extension's scripted modules (each holds <Module>.py and Resources/).
MODULE_DIRS = ("MMRegCommon", "MIRegistration", "RegistrationTraining", "LearnedMetric", "MultiscaleRegistration",
               "GradRegistration", "DisentangledRegistration")

pytest.importorskip("slicer", reason="slicer-core (the Slicer MRML libraries) is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parent))
for folder in MODULE_DIRS:
    sys.path.insert(0, str(REPO / folder))

import slicer_framework  # noqa: E402

slicer_framework.install()


@pytest.fixture
def scene():
    """The application scene (``slicer.mrmlScene``), emptied before and after the test.

    It gets the subject hierarchy node that Slicer's scene always has (a bare scene would make it
    on first use, which would look like a node added by the code under test).
    """
    import slicer
    slicer.mrmlScene.Clear(0)
    slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(slicer.mrmlScene)
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(0)


@pytest.fixture
def case(scene):
    """The shared synthetic pair in the scene (:func:`MMRegCommonLib.testing.make_synthetic_pair`): fixed and
    moving volumes on different grids, moving = fixed translated by a known vector, a segmentation each."""
    from MMRegCommonLib.testing import make_synthetic_pair
    return make_synthetic_pair(scene)
