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
A list of nodes (``list[vtkMRML...Node]``, e.g. the target volumes of a label propagation)
is shown by a ``qMRMLCheckableNodeComboBox`` carrying ``MMRegNodeListParameterName``
(:data:`NODE_LIST_PROPERTY`): the checked nodes are the list (bound by the framework too, as
parameterNodeWrapper has no connector for node lists).
"""
from typing import Annotated

import slicer
from slicer.parameterNodeWrapper import WithinRange

#: Parameters whose combo boxes are filled at run time and bound by the framework (item data).
COMBO_PARAMETERS = ("model", "device")
#: Dynamic .ui property naming the parameter of a framework-bound combo box.
COMBO_PROPERTY = "MMRegParameterName"
#: Dynamic .ui property naming the node-list parameter of a checkable node selector (qMRMLCheckableNodeComboBox).
NODE_LIST_PROPERTY = "MMRegNodeListParameterName"


#: Refinement steps a module starts with. The shipped networks were trained briefly on a CPU and are
#: below the affine start on several pairs; 20 steps after the network gave IXI T1-T1 Dice 0.611 vs
#: the network's 0.479 (ANTs SyN 0.603) at 5.7 s per 2 mm pair on 2 CPU cores (docs/optimize.md).
DEFAULT_REFINEMENT_STEPS = 20


class RegistrationParameters:
    """Parameters shared by all method modules (camelCase names, as Slicer's parameter nodes use).

    Inputs: ``fixedVolume`` (stays in place), ``movingVolume`` (deformed onto it),
    ``movingSegmentation`` (optional; warped with the image), ``fixedSegmentation``
    (optional; only for scoring: Dice per segment matched by name). Method: ``model`` ("" =
    the method's default model), ``device`` ("auto", "cpu", "cuda", "cuda:N", "mps").
    Options: ``affine`` (affine pre-alignment first), ``refinementSteps`` (instance
    optimisation steps after the network, 0 = network alone; methods without a network ignore
    it; default :data:`DEFAULT_REFINEMENT_STEPS`), ``diffeomorphic``, ``symmetric`` (a velocity network
    run on both orders of the pair; network methods only), ``placeMovingUnderTransform``
    (after Apply, put the moving volume under the result so it overlays the fixed one). Outputs (None = create new):
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
    refinementSteps: Annotated[int, WithinRange(0, 2000)] = DEFAULT_REFINEMENT_STEPS
    diffeomorphic: bool = True
    symmetric: bool = False
    placeMovingUnderTransform: bool = True
    outputTransform: slicer.vtkMRMLGridTransformNode
    outputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode


class PropagationParameters:
    """Parameters of the "propagate segmentation" action (a module whose panel has it adds this class to its
    parameter node's bases, e.g. ``class P(PropagationParameters, RegistrationParameters)``).

    The atlas is the shared ``movingVolume`` with its ``movingSegmentation``; ``targetVolumes``: the
    volumes that each receive a copy of the atlas segmentation (each registered as the fixed image,
    the atlas as the moving one). Stored as Slicer stores lists of nodes (``targetVolumes_len`` and
    node references ``targetVolumes_0``, ...); a target removed from the scene reads as None. Assign
    a whole new list to change it (in Slicer the list read is an ObservedList that writes through
    on in-place changes; code here never relies on that).
    """

    targetVolumes: list[slicer.vtkMRMLScalarVolumeNode]
