"""Conversions between Slicer MRML nodes and the engine's data (SimpleITK images, LPS).

Conventions (see DESIGN.md, "Geometry conventions"):

* The engine's image type is a SimpleITK image in LPS physical space: origin (mm, centre of
  voxel (0, 0, 0)), spacing (mm) and a direction matrix whose columns are the index axes.
  Slicer is RAS. With ``F = diag(-1, -1, 1)`` (:data:`LPS_TO_RAS`, its own inverse):
  ``origin_ras = F @ origin_lps``, ``direction_ras = F @ direction_lps`` and, for vectors,
  ``v_ras = F @ v_lps``. A volume node's IJKToRAS matrix is
  ``[[F @ D @ diag(spacing), F @ origin], [0, 0, 0, 1]]``.
* Numpy arrays are in SimpleITK/VTK memory order ``(k, j, i)`` = ``(z, y, x)``.
* A displacement field is a 3-component float64 SimpleITK image on the FIXED grid, LPS mm,
  resampling convention: fixed point x corresponds to moving point ``x + u(x)`` (ITK
  DisplacementFieldTransform). In Slicer this is the grid transform's *FromParent*
  transform (world/fixed -> local/moving, the direction used for resampling); a moving
  volume placed under the node is displayed on top of the fixed volume.
* Conversions read and write a node's own (local) coordinates; a parent transform of the
  node is ignored (harden it first if it should be applied).
* Nodes given as input are never modified; temporary nodes are removed before returning.

This module imports ``slicer`` and ``vtk`` and only converts data; all the science is in
:mod:`mmreg`.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from mmreg.errors import InputError
from mmreg.transforms import check_displacement, displacement_transform

#: LPS <-> RAS flip (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

_TMP_NAME = "__mmreg_bridge_tmp__"
_INTEGER_DTYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64)


# ---------------------------------------------------------------------------- matrices
def _vtk_matrix(m: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    m = np.asarray(m, dtype=float)
    n = m.shape[0]
    for r in range(n):
        for c in range(n):
            out.SetElement(r, c, float(m[r, c]))
    return out


def _np_matrix(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """4x4 IJKToRAS matrix of an LPS SimpleITK image's grid."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    m[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=float)
    return m


def _set_lps_geometry(image: sitk.Image, origin_ras, spacing, direction_ras) -> None:
    image.SetOrigin(tuple(float(v) for v in LPS_TO_RAS @ np.asarray(origin_ras, dtype=float)))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in (LPS_TO_RAS @ np.asarray(direction_ras, dtype=float)).ravel()))


def _check_3d(image: sitk.Image, what: str, components: int) -> None:
    if not isinstance(image, sitk.Image):
        raise InputError(f"{what} must be a SimpleITK image, not {type(image).__name__}.")
    if image.GetDimension() != 3:
        raise InputError(f"{what} is {image.GetDimension()}-D; the bridge converts 3-D images only "
                         "(mmreg.image.read_image turns 2-D slices into single-slice volumes).")
    if image.GetNumberOfComponentsPerPixel() != components:
        raise InputError(f"{what} has {image.GetNumberOfComponentsPerPixel()} component(s) per voxel; "
                         f"{components} expected.")


# ---------------------------------------------------------------------------- volumes
def image_from_volume_node(node) -> sitk.Image:
    """A copy of a scalar or labelmap volume node as a SimpleITK image in LPS.

    Geometry comes from the node's IJKToRAS matrix (spacing = column norms, origin and
    direction flipped with F = diag(-1, -1, 1)); voxel values and their type are copied from
    the node's image data (array order (k, j, i)). A non-zero image-data extent start is
    honoured (the origin moves to the first stored voxel). The node is not modified and its
    parent transform, if any, is not applied.
    """
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError("Expected a scalar or labelmap volume node, got "
                         f"{'nothing' if node is None else node.GetClassName()}.")
    image_data = node.GetImageData()
    if image_data is None or image_data.GetNumberOfPoints() == 0:
        raise InputError(f"Volume '{node.GetName()}' has no voxels; load or compute the volume first.")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise InputError(f"Volume '{node.GetName()}' has {image_data.GetNumberOfScalarComponents()} components "
                         "per voxel; a scalar volume is needed (extract one component first).")
    dims = image_data.GetDimensions()
    arr = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    arr = np.array(arr, copy=True).reshape(tuple(reversed(dims)))
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    m = _np_matrix(m)
    extent = image_data.GetExtent()
    start = np.array(extent[0::2], dtype=float)
    linear = m[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    image = sitk.GetImageFromArray(arr)
    _set_lps_geometry(image, linear @ start + m[:3, 3], spacing, linear / spacing)
    return image


def _add_volume_display_node(scene, node, labelmap: bool) -> None:
    # Headless scenes (slicer-core without the application) have no default colour tables;
    # CreateDefaultDisplayNodes would then reference a missing table (and warn for labelmaps).
    default_color = "vtkMRMLColorTableNodeLabels" if labelmap else "vtkMRMLColorTableNodeGrey"
    if scene.GetNodeByID(default_color) is not None or not labelmap:
        node.CreateDefaultDisplayNodes()
        return
    display = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeDisplayNode")
    node.SetAndObserveDisplayNodeID(display.GetID())


def volume_node_from_image(image: sitk.Image, scene, name: str, labelmap: bool = False):
    """A new volume node in ``scene`` holding a copy of an LPS SimpleITK image.

    Returns a ``vtkMRMLScalarVolumeNode`` (or ``vtkMRMLLabelMapVolumeNode`` with
    ``labelmap=True``; label images must hold whole numbers) whose IJKToRAS matrix is
    ``[[F @ D @ diag(spacing), F @ origin], [0, 0, 0, 1]]`` and whose image data has extent
    starting at 0, origin 0, spacing 1 (the MRML convention). A display node is added (without
    a colour table for labelmaps when the scene has no default tables, e.g. headless).
    64-bit integer images are stored as 32-bit (VTK cannot display 64-bit voxels).
    """
    _check_3d(image, "The image", 1)
    arr = sitk.GetArrayFromImage(image)
    if arr.dtype in (np.int64, np.uint64):
        if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
            raise InputError("The image has 64-bit integer values beyond the 32-bit range; Slicer volumes "
                             "cannot hold them.")
        arr = arr.astype(np.int32)
    if labelmap and arr.dtype not in _INTEGER_DTYPES:
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InputError("A labelmap volume needs whole-number labels; the image has fractional values.")
        arr = arr.astype(np.int32)
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name)
    node.SetIJKToRASMatrix(_vtk_matrix(_ijk_to_ras(image)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(arr))
    _add_volume_display_node(scene, node, labelmap)
    return node


def scalar_map_node_from_image(image: sitk.Image, scene, name: str, value_range=None, color_node_id: str | None = None):
    """A new scalar volume node showing an engine map (attention weights, gate maps, a translated image).

    Geometry and voxels as :func:`volume_node_from_image` (LPS -> RAS; the map keeps the grid it came
    on, e.g. the fixed image's for ``RegistrationResult.extra_images``); voxels stored as float32.
    ``value_range`` ``(low, high)``: the display window is fixed to it (automatic window/level off),
    for maps whose values have a fixed meaning (weights in [0, 1]: equal weights look equal in every
    map); None keeps Slicer's automatic window/level. ``color_node_id``: the colour table of the
    display (e.g. ``"vtkMRMLColorTableNodeFileViridis.txt"``) when the scene has that node, else the
    default grey. Returns the node.
    """
    _check_3d(image, "The map", 1)
    node = volume_node_from_image(sitk.Cast(image, sitk.sitkFloat32), scene, name)
    set_scalar_display(node, value_range, color_node_id)
    return node


def set_scalar_display(node, value_range=None, color_node_id: str | None = None) -> None:
    """Display a scalar volume node with a fixed window over ``value_range`` ``(low, high)`` (None: automatic
    window/level) and the colour table ``color_node_id`` when its scene has it (else unchanged). A display
    node is added when the node has none. Voxels and geometry are not touched."""
    if node.GetDisplayNode() is None:
        _add_volume_display_node(node.GetScene(), node, labelmap=False)
    display = node.GetDisplayNode()
    if value_range is not None:
        low, high = (float(v) for v in value_range)
        if not high > low:
            raise InputError(f"Display range ({low}, {high}) is empty; the upper value must exceed the lower one.")
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(low, high)
    else:
        display.AutoWindowLevelOn()
    if color_node_id and node.GetScene() is not None and node.GetScene().GetNodeByID(color_node_id) is not None:
        display.SetAndObserveColorNodeID(color_node_id)


# ---------------------------------------------------------------------------- transforms
def _grid_geometry(grid) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """(origin_ras of the first stored grid point, spacing, direction_ras, dims) of a grid transform."""
    image_data = grid.GetDisplacementGrid()
    direction = np.eye(3)
    if grid.GetGridDirectionMatrix() is not None:
        direction = _np_matrix(grid.GetGridDirectionMatrix())[:3, :3]
    spacing = np.array(image_data.GetSpacing(), dtype=float)
    start = np.array(image_data.GetExtent()[0::2], dtype=float)
    origin = np.array(image_data.GetOrigin(), dtype=float) + direction @ (spacing * start)
    return origin, spacing, direction, image_data.GetDimensions()


def grid_transform_node_from_displacement(field: sitk.Image, scene, name: str,
                                          interpolation: str = "linear"):
    """A new ``vtkMRMLGridTransformNode`` whose FromParent transform is the displacement ``field``.

    ``field``: 3-component SimpleITK vector image on the fixed grid, LPS mm, resampling
    convention (fixed point x <-> moving point x + u(x)). The node holds a
    ``vtkOrientedGridTransform`` built as Slicer builds one when it reads an ITK displacement
    file (vtkITKTransformConverter): displacement grid = 3-component double ``vtkImageData``
    with origin ``F @ origin_lps`` and the field's spacing, grid direction matrix
    ``F @ D_lps``, RAS vectors ``F @ u``. ``GetTransformFromParent().TransformPoint(p)`` maps a
    fixed RAS point p to ``F @ (x + u(x))`` with ``x = F @ p``. ``interpolation`` is
    "linear" (default, the same as ITK/SimpleITK) or "cubic" (what Slicer uses for files it
    reads). Outside the grid VTK uses the displacement of the nearest grid edge, where ITK
    uses zero.
    """
    _check_3d(field, "The displacement field", 3)
    check_displacement(field)
    if interpolation not in ("linear", "cubic"):
        raise InputError(f"Grid interpolation must be 'linear' or 'cubic', not '{interpolation}'.")
    arr = sitk.GetArrayFromImage(sitk.Cast(field, sitk.sitkVectorFloat64))
    arr_ras = np.ascontiguousarray((arr * np.array([-1.0, -1.0, 1.0])).reshape(-1, 3))
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(field.GetSize())
    image_data.SetOrigin(tuple(LPS_TO_RAS @ np.array(field.GetOrigin(), dtype=float)))
    image_data.SetSpacing(field.GetSpacing())
    vectors = numpy_support.numpy_to_vtk(arr_ras, deep=True, array_type=vtk.VTK_DOUBLE)
    vectors.SetNumberOfComponents(3)
    vectors.SetName("DisplacementField")
    image_data.GetPointData().SetScalars(vectors)

    grid = slicer.vtkOrientedGridTransform()
    grid.SetDisplacementGridData(image_data)
    direction = np.eye(4)
    direction[:3, :3] = LPS_TO_RAS @ np.array(field.GetDirection(), dtype=float).reshape(3, 3)
    grid.SetGridDirectionMatrix(_vtk_matrix(direction))
    if interpolation == "linear":
        grid.SetInterpolationModeToLinear()
    else:
        grid.SetInterpolationModeToCubic()
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    node.SetAndObserveTransformFromParent(grid)
    return node


def _sample_from_parent(transform_node, reference: sitk.Image) -> sitk.Image:
    """Sample a node's FromParent transform on ``reference``'s grid as an LPS displacement image."""
    size = reference.GetSize()
    kk, jj, ii = np.meshgrid(*[np.arange(n, dtype=float) for n in reversed(size)], indexing="ij")
    index = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
    m = _ijk_to_ras(reference)
    points_ras = index @ m[:3, :3].T + m[:3, 3]
    vtk_in = vtk.vtkPoints()
    vtk_in.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(points_ras), deep=True,
                                              array_type=vtk.VTK_DOUBLE))
    vtk_out = vtk.vtkPoints()
    vtk_out.SetDataTypeToDouble()
    transform_node.GetTransformFromParent().TransformPoints(vtk_in, vtk_out)
    mapped = numpy_support.vtk_to_numpy(vtk_out.GetData()).astype(np.float64)
    disp_lps = (mapped - points_ras) * np.array([-1.0, -1.0, 1.0])
    field = sitk.GetImageFromArray(disp_lps.reshape(tuple(reversed(size)) + (3,)), isVector=True)
    field.CopyInformation(reference)
    return field


def displacement_from_grid_transform_node(node, reference: sitk.Image | None = None) -> sitk.Image:
    """The node's FromParent transform as an LPS displacement image (float64, mm).

    For a grid transform stored FromParent (what :func:`grid_transform_node_from_displacement`
    and Slicer's ITK reader make) the displacement grid is converted exactly: origin and
    direction flipped back, vectors ``F @ v_ras`` (DisplacementScale/Shift applied). Any other
    transform (a grid stored ToParent, whose FromParent is an iterative inverse; linear,
    B-spline or composite transforms) is sampled point by point: on ``reference``'s grid when
    given, else on the grid of the node's displacement grid. ``reference`` also forces
    sampling of a plain grid transform onto another grid. The node is not modified.
    """
    if node is None or not node.IsA("vtkMRMLTransformNode"):
        raise InputError("Expected a transform node, got "
                         f"{'nothing' if node is None else node.GetClassName()}.")
    transform = node.GetTransformFromParent()
    if transform is None:
        raise InputError(f"Transform node '{node.GetName()}' holds no transform.")
    transform.Update()
    grid = transform if transform.IsA("vtkOrientedGridTransform") else None
    if reference is None and grid is None:
        raise InputError(f"Transform node '{node.GetName()}' holds a {transform.GetClassName()}, not a "
                         "grid transform; pass a reference image to sample it as a displacement field.")
    if reference is None and grid is not None and grid.GetInverseFlag():
        # Stored ToParent: sample the (iteratively inverted) FromParent on the stored grid's points.
        origin, spacing, direction, dims = _grid_geometry(grid)
        reference = sitk.Image(dims, sitk.sitkUInt8)
        _set_lps_geometry(reference, origin, spacing, direction)
    if reference is not None:
        _check_3d(reference, "The reference image", reference.GetNumberOfComponentsPerPixel())
        return _sample_from_parent(node, reference)

    image_data = grid.GetDisplacementGrid()
    if image_data is None or image_data.GetNumberOfScalarComponents() != 3:
        raise InputError(f"Grid transform '{node.GetName()}' has no 3-component displacement grid.")
    if hasattr(image_data, "GetDirectionMatrix"):
        img_dir = np.array([[image_data.GetDirectionMatrix().GetElement(r, c) for c in range(3)] for r in range(3)])
        if not np.allclose(img_dir, np.eye(3)):
            raise InputError(f"Grid transform '{node.GetName()}': the displacement image data carries its own "
                             "direction matrix, which vtkOrientedGridTransform does not use; not supported.")
    origin, spacing, direction, dims = _grid_geometry(grid)
    arr = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).astype(np.float64)
    arr = arr.reshape(tuple(reversed(dims)) + (3,)) * grid.GetDisplacementScale() + grid.GetDisplacementShift()
    arr = arr * np.array([-1.0, -1.0, 1.0])
    field = sitk.GetImageFromArray(arr, isVector=True)
    _set_lps_geometry(field, origin, spacing, direction)
    return field


def place_under_transform(node, transform_node) -> None:
    """Put a transformable node (volume, segmentation, ...) under ``transform_node`` (None: remove).

    With a registration result's grid transform node, a moving volume placed under it is shown
    resampled onto the fixed image (world) space. Nothing is resampled until :func:`harden`.
    """
    if transform_node is not None and transform_node.GetScene() is not node.GetScene():
        raise InputError("The node and the transform node must be in the same scene.")
    node.SetAndObserveTransformNodeID(transform_node.GetID() if transform_node is not None else None)


def harden(node):
    """Apply ("harden") the node's parent transform to its data, as Slicer's Transforms module does.

    Uses ``vtkSlicerTransformLogic.hardenTransform`` (= ``node.HardenTransform()``). For a
    volume under a non-linear (grid) transform, MRML resamples the voxels with linear
    interpolation through the world->local (FromParent) transform, on a lattice with the
    volume's own orientation and spacing whose extent is recomputed to contain the transformed
    volume (vtkImageReslice AutoCropOutput, so the origin can move by a fraction of a voxel);
    the background is the median corner value. Returns the node.
    """
    if node.GetParentTransformNode() is None:
        return node
    if not slicer.vtkSlicerTransformLogic.hardenTransform(node):
        raise RuntimeError(f"Slicer could not harden the transform of '{node.GetName()}'.")
    return node


# ---------------------------------------------------------------------------- segmentations
def _binary_name() -> str:
    return slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


def _ensure_converter_rules() -> None:
    """Register the segmentation conversion rules that Slicer's Segmentations module registers.

    Inside Slicer they are registered at start-up (this is then a no-op); a bare slicer-core
    has none, and segments cannot even hold an empty binary labelmap without them.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    present = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for cls in ("vtkBinaryLabelmapToClosedSurfaceConversionRule", "vtkClosedSurfaceToBinaryLabelmapConversionRule"):
        if cls not in present:
            factory.RegisterConverterRule(getattr(slicer, cls)())


def _color_node_ids(scene) -> set:
    nodes = scene.GetNodesByClass("vtkMRMLColorNode")
    return {nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())}


def segmentation_to_labelmap_image(segmentation_node, reference_volume_node=None):
    """Export all segments to one integer label image (LPS) and say which value is which segment.

    Uses ``vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode``: segment number i
    (in the segmentation's order) gets label value i + 1, 0 is background; where segments
    overlap the voxel takes a single label (a multi-label map cannot hold overlaps). The
    geometry is the reference volume's when given, else the segmentation's reference image
    geometry enlarged to contain every segment. Returns ``(labels, info)`` where ``info`` maps
    each label value to ``{"id", "name", "color" (RGB in 0..1), "terminology"}``. The
    segmentation node is not modified (a segmentation without a binary labelmap is converted
    on a temporary copy); the node's parent transform is not applied.
    """
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("Expected a segmentation node.")
    scene = segmentation_node.GetScene()
    if scene is None:
        raise InputError("The segmentation node must be in a scene.")
    _ensure_converter_rules()
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not ids:
        raise InputError(f"Segmentation '{segmentation_node.GetName()}' has no segments.")
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    temporary = []
    try:
        source = segmentation_node
        # Slicer's export converts the segments to binary labelmaps and adds a display node when
        # they are missing, i.e. it would modify the input: work on a temporary copy then.
        if not segmentation.ContainsRepresentation(_binary_name()) or segmentation_node.GetDisplayNode() is None:
            source = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", _TMP_NAME)
            temporary.append(source)
            source.GetSegmentation().DeepCopy(segmentation)
            source.GetSegmentation().CopyConversionParameters(segmentation)  # (reference geometry)
            if not source.GetSegmentation().CreateRepresentation(_binary_name()):
                raise InputError(f"Segmentation '{segmentation_node.GetName()}' cannot be converted to a binary "
                                 "labelmap (source representation "
                                 f"'{segmentation.GetSourceRepresentationName()}').")
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", _TMP_NAME)
        temporary.append(labelmap)
        _add_volume_display_node(scene, labelmap, labelmap=True)  # (avoids a missing-colour warning headless)
        id_array = vtk.vtkStringArray()
        for segment_id in ids:
            id_array.InsertNextValue(segment_id)
        if reference_volume_node is not None:
            mode = slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
        else:
            mode = slicer.vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS_AND_REFERENCE_GEOMETRY
        colors_before = _color_node_ids(scene)
        ok = logic.ExportSegmentsToLabelmapNode(source, id_array, labelmap, reference_volume_node, mode)
        # The export makes a colour table named after the segments: use it to check the numbering,
        # then remove it with the other temporary nodes (never a colour table that was there before).
        temporary.extend(scene.GetNodeByID(i) for i in _color_node_ids(scene) - colors_before)
        display = labelmap.GetDisplayNode()
        color_node = display.GetColorNode() if display is not None else None
        if not ok:
            raise InputError(f"Slicer could not export segmentation '{segmentation_node.GetName()}' to a labelmap.")
        if labelmap.GetImageData() is None or labelmap.GetImageData().GetNumberOfPoints() == 0:
            raise InputError(f"Segmentation '{segmentation_node.GetName()}' is empty and has no reference "
                             "geometry; give a reference volume.")
        labels = image_from_volume_node(labelmap)
        info = {}
        for index, segment_id in enumerate(ids):
            segment = segmentation.GetSegment(segment_id)
            value = index + 1
            # Slicer numbers exported segments 1..N in the order given and names the colour table
            # entries after them; check it, so that a change in Slicer cannot mislabel silently.
            if color_node is not None and color_node.GetColorName(value) not in (segment.GetName(),
                                                                                 segment.GetName().replace(" ", "_")):
                raise RuntimeError(f"Unexpected label numbering in Slicer's export: value {value} is "
                                   f"'{color_node.GetColorName(value)}', expected '{segment.GetName()}'.")
            info[value] = {"id": segment_id, "name": segment.GetName(),
                           "color": tuple(float(c) for c in segment.GetColor()),
                           "terminology": segment.GetTerminology() if hasattr(segment, "GetTerminology") else ""}
        return labels, info
    finally:
        for node in temporary:
            if node.GetScene() is not None:
                display = node.GetDisplayNode() if hasattr(node, "GetDisplayNode") else None
                if display is not None and display.GetScene() is not None:
                    scene.RemoveNode(display)
                scene.RemoveNode(node)


def _default_color(value: int) -> tuple:
    rng = np.random.default_rng(value)
    return tuple(float(c) for c in rng.uniform(0.2, 1.0, 3))


def segmentation_node_from_labelmap_image(labels: sitk.Image, scene, name: str, segment_info: dict | None = None):
    """A new segmentation node with one segment per label value, sharing one binary labelmap layer.

    ``labels``: integer SimpleITK image (LPS). ``segment_info`` maps label values to
    ``{"id", "name", "color", "terminology"}`` (as returned by
    :func:`segmentation_to_labelmap_image`); every listed value becomes a segment with that ID,
    name and colour (empty if the value is absent from the image); values present in the image
    but not listed get a segment "Label <value>". The labelmap is stored as it is (the source
    representation, one shared layer, each segment's label value = its value in ``labels``);
    the segmentation's reference geometry is the label image's grid.
    """
    _check_3d(labels, "The label image", 1)
    arr = sitk.GetArrayFromImage(labels)
    if arr.dtype not in _INTEGER_DTYPES:
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InputError("The label image must hold whole-number labels.")
    if arr.size and arr.min() < 0:
        raise InputError("The label image has negative labels; labels must be 0 (background) or positive.")
    top = int(arr.max()) if arr.size else 0
    dtype = np.uint8 if top <= 255 else np.int16 if top <= 32767 else np.int32
    arr = np.ascontiguousarray(arr.astype(dtype))
    segment_info = dict(segment_info or {})
    for value in np.unique(arr):
        if value != 0 and int(value) not in segment_info:
            segment_info[int(value)] = {"name": f"Label {int(value)}", "color": _default_color(int(value))}
    _ensure_converter_rules()

    oriented = slicer.vtkOrientedImageData()
    oriented.SetDimensions(labels.GetSize())
    scalars = numpy_support.numpy_to_vtk(arr.ravel(), deep=True,
                                         array_type=numpy_support.get_vtk_array_type(arr.dtype))
    oriented.GetPointData().SetScalars(scalars)
    oriented.SetImageToWorldMatrix(_vtk_matrix(_ijk_to_ras(labels)))

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    segmentation = node.GetSegmentation()
    segmentation.SetSourceRepresentationName(_binary_name())
    segmentation.SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(oriented))
    for value in sorted(segment_info):
        if int(value) <= 0:
            continue
        entry = segment_info[value]
        segment = slicer.vtkSegment()
        segment.SetName(str(entry.get("name", f"Label {value}")))
        segment.SetColor(*[float(c) for c in entry.get("color", _default_color(int(value)))][:3])
        if entry.get("terminology") and hasattr(segment, "SetTerminology"):
            segment.SetTerminology(entry["terminology"])
        segment.SetLabelValue(int(value))
        segment.AddRepresentation(_binary_name(), oriented)
        segment_id = str(entry.get("id") or "")
        if segment_id and segmentation.GetSegment(segment_id) is not None:
            segment_id = segmentation.GenerateUniqueSegmentID(segment_id)
        if not segmentation.AddSegment(segment, segment_id):
            raise RuntimeError(f"Could not add segment '{segment.GetName()}' to '{name}'.")
    return node


def warp_segmentation_node(segmentation_node, field: sitk.Image, fixed_reference: sitk.Image, scene, name: str,
                           interpolation: str = "linear"):
    """Warp a (moving) segmentation onto the fixed grid through a displacement field; a new node.

    The segments are exported to one label map (:func:`segmentation_to_labelmap_image`, the
    segmentation's own geometry), resampled onto ``fixed_reference``'s grid with
    :func:`mmreg.labels.warp_labels` through the field (LPS mm, resampling convention: the
    fixed point x takes the label found at x + u(x)), and imported as a new segmentation node
    named ``name`` with the same segment IDs, names and colours. ``interpolation`` "linear"
    (per-label linear + argmax, default) or "nearest". The input node is not modified.
    """
    from mmreg.labels import warp_labels

    _check_3d(fixed_reference, "The fixed reference image", fixed_reference.GetNumberOfComponentsPerPixel())
    labels, info = segmentation_to_labelmap_image(segmentation_node)
    warped = warp_labels(labels, displacement_transform(field), fixed_reference, interpolation=interpolation)
    return segmentation_node_from_labelmap_image(warped, scene, name, info)
