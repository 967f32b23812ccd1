"""The parameters every method module keeps in its parameter node.

A module declares its parameter node as a thin subclass decorated with Slicer's
``parameterNodeWrapper``::

    @parameterNodeWrapper
    class MIRegistrationParameterNode(RegistrationParameters):
        pass                     # (a method-specific parameter would be added here)

The values live in the module's ``vtkMRMLScriptedModuleNode`` in the scene, so saving and
reloading the scene restores them. In the module's ``.ui`` file each parameter is bound to
its widget by the dynamic property ``SlicerParameterName`` (parameterNodeWrapper connects
those), except :data:`COMBO_PARAMETERS`, whose combo boxes are filled at run time (models
found by the engine, devices detected on this computer) and which carry the property
``MMRegParameterName`` instead; the framework's Widget binds those by the items' data.
"""
from typing import Annotated

import slicer
from slicer.parameterNodeWrapper import WithinRange

#: Parameters whose combo boxes are filled at run time and bound by the framework (item data).
COMBO_PARAMETERS = ("model", "device")
#: Dynamic .ui property naming the parameter of a framework-bound combo box.
COMBO_PROPERTY = "MMRegParameterName"


class RegistrationParameters:
    """Parameters shared by all method modules (camelCase names, as Slicer's parameter nodes use).

    Inputs: ``fixedVolume`` (stays in place), ``movingVolume`` (deformed onto it),
    ``movingSegmentation`` (optional; warped with the image), ``fixedSegmentation``
    (optional; only for scoring: Dice per segment matched by name). Method: ``model`` ("" =
    the method's default model), ``device`` ("auto", "cpu", "cuda", "cuda:N", "mps").
    Options: ``affine`` (affine pre-alignment first), ``refinementSteps`` (instance
    optimisation steps after the network, 0 = network alone; methods without a network ignore
    it), ``diffeomorphic``, ``placeMovingUnderTransform`` (after Apply, put the moving volume
    under the result so it overlays the fixed one). Outputs (None = create new):
    ``outputTransform`` (grid transform, fixed -> moving, Slicer's "from parent"),
    ``outputVolume`` (moving resampled on the fixed grid), ``outputSegmentation``.
    """

    fixedVolume: slicer.vtkMRMLScalarVolumeNode
    movingVolume: slicer.vtkMRMLScalarVolumeNode
    movingSegmentation: slicer.vtkMRMLSegmentationNode
    fixedSegmentation: slicer.vtkMRMLSegmentationNode
    model: str = ""
    device: str = "auto"
    affine: bool = True
    refinementSteps: Annotated[int, WithinRange(0, 2000)] = 0
    diffeomorphic: bool = True
    placeMovingUnderTransform: bool = True
    outputTransform: slicer.vtkMRMLGridTransformNode
    outputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
