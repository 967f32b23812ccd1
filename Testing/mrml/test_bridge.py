"""MRML bridge tests with the real Slicer MRML libraries (``slicer-core``, headless, no Qt).

Every test uses oblique, anisotropic, differently sized grids and checks numbers against
analytic answers. Conventions under test (DESIGN.md, "Geometry conventions"): LPS engine,
RAS Slicer, F = diag(-1, -1, 1); a displacement field u on the fixed grid maps the fixed point
x to the moving point x + u(x), which is Slicer's FromParent transform.
"""
from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (the Slicer MRML libraries) is not installed")
vtk = pytest.importorskip("vtk")
sitk = pytest.importorskip("SimpleITK")

from mmreg.transforms import displacement_transform, write_transform  # noqa: E402
from mmreg_slicer import bridge  # noqa: E402

F = np.diag([-1.0, -1.0, 1.0])
T = np.array([3.0, -2.0, 5.0])                      # known translation, LPS mm
SIN_AMPLITUDE, SIN_WAVELENGTH = 2.0, 25.0           # mm
SIN_AXIS = np.array([1.0, 0.5, -0.3]) / np.linalg.norm([1.0, 0.5, -0.3])   # oblique wave axis
SIN_DIR = np.array([0.2, 1.0, 0.4]) / np.linalg.norm([0.2, 1.0, 0.4])      # oblique displacement


# ---------------------------------------------------------------------------- helpers
def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    return np.array(sitk.VersorTransform(tuple(axis), np.deg2rad(degrees)).GetMatrix()).reshape(3, 3)


def make_image(size, spacing, origin, direction, pixel=sitk.sitkFloat32) -> sitk.Image:
    image = sitk.Image(size, pixel)
    image.SetSpacing(spacing)
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    return image


def index_to_lps(image: sitk.Image, index: np.ndarray) -> np.ndarray:
    """Continuous ITK indices (N, 3) -> LPS points (N, 3)."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    return np.asarray(index, float) @ (d @ np.diag(image.GetSpacing())).T + np.array(image.GetOrigin())


def lps_to_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    d = np.array(image.GetDirection()).reshape(3, 3)
    return (np.asarray(points, float) - np.array(image.GetOrigin())) @ d / np.array(image.GetSpacing())


def grid_points(image: sitk.Image) -> np.ndarray:
    """LPS points of every voxel, in numpy (k, j, i) memory order, shape (N, 3)."""
    kk, jj, ii = np.meshgrid(*[np.arange(n, dtype=float) for n in reversed(image.GetSize())], indexing="ij")
    return index_to_lps(image, np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1))


def image_like(image: sitk.Image, values: np.ndarray, vector=False) -> sitk.Image:
    shape = tuple(reversed(image.GetSize())) + ((3,) if vector else ())
    out = sitk.GetImageFromArray(np.asarray(values).reshape(shape), isVector=vector)
    out.CopyInformation(image)
    return out


def u_translation(x):
    return np.broadcast_to(T, np.shape(x)).copy()


def u_sinusoid(x):
    s = np.asarray(x) @ SIN_AXIS
    return SIN_AMPLITUDE * np.sin(2 * np.pi * s / SIN_WAVELENGTH)[:, None] * SIN_DIR


def u_both(x):
    return u_translation(x) + u_sinusoid(x)


def field_on(image: sitk.Image, u) -> sitk.Image:
    return image_like(image, u(grid_points(image)).astype(np.float64), vector=True)


def linear_interpolation_bound(spacing, direction, hessian_axis_bound) -> float:
    """Trilinear interpolation error bound: 1/8 * sum_i h_i^2 * max |d2f/de_i^2| (e_i grid axes)."""
    d = np.asarray(direction).reshape(3, 3)
    return 0.125 * sum(h * h * hessian_axis_bound(d[:, i]) for i, h in enumerate(spacing))


def sinusoid_second_derivative(e):
    """max |d2u/de2| (vector norm) of u_sinusoid along unit direction e."""
    return SIN_AMPLITUDE * (2 * np.pi / SIN_WAVELENGTH) ** 2 * float(SIN_AXIS @ e) ** 2


@pytest.fixture()
def fixed() -> sitk.Image:
    """The fixed grid: oblique (20 deg about an oblique axis), anisotropic, non-zero origin."""
    return make_image((23, 17, 11), (0.7, 1.3, 2.1), (12.5, -40.2, 7.3), rotation((1, 2, 0.5), 20))


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def transform_points(transform, points_ras: np.ndarray) -> np.ndarray:
    return np.array([transform.TransformPoint(tuple(p)) for p in points_ras])


def sample_indices(image: sitk.Image, n=200, margin=0.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hi = np.array(image.GetSize(), float) - 1 - margin
    return rng.uniform(margin, hi, size=(n, 3))


# ---------------------------------------------------------------------------- 1. volumes
def test_volume_round_trip_oblique_anisotropic(fixed, scene):
    rng = np.random.default_rng(1)
    values = rng.normal(size=tuple(reversed(fixed.GetSize()))).astype(np.float32)
    image = image_like(fixed, values)
    node = bridge.volume_node_from_image(image, scene, "vol")
    assert node.GetClassName() == "vtkMRMLScalarVolumeNode"
    assert node.GetDisplayNode() is not None

    # IJKToRAS applied to an index == F @ sitk's physical point.
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    for index in [(0, 0, 0), (22, 16, 10), (5, 11, 3), (17, 2, 9)]:
        ras = np.array(m.MultiplyPoint(tuple(float(i) for i in index) + (1.0,)))[:3]
        np.testing.assert_allclose(ras, F @ np.array(image.TransformIndexToPhysicalPoint(index)), atol=1e-9)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node), values, atol=0)

    back = bridge.image_from_volume_node(node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), values)
    assert back.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)

    # A copy: changing the returned image leaves the node alone, and the node is unchanged.
    before = slicer.util.arrayFromVolume(node).copy()
    back[0, 0, 0] = 1e6
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before)


def test_labelmap_round_trip_keeps_integer_type(fixed, scene):
    rng = np.random.default_rng(2)
    values = rng.integers(0, 300, size=tuple(reversed(fixed.GetSize()))).astype(np.int16)
    labels = image_like(fixed, values)
    node = bridge.volume_node_from_image(labels, scene, "labels", labelmap=True)
    assert node.GetClassName() == "vtkMRMLLabelMapVolumeNode"
    back = bridge.image_from_volume_node(node)
    assert back.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), values)
    np.testing.assert_allclose(back.GetDirection(), labels.GetDirection(), atol=1e-6)


def test_volume_with_nonzero_extent_start(fixed, scene):
    # IJK in IJKToRAS is the image-data (extent) index; compare with Slicer's own normalisation.
    image = image_like(fixed, np.arange(fixed.GetNumberOfPixels(), dtype=np.float32))
    node = bridge.volume_node_from_image(image, scene, "vol")
    node.GetImageData().SetExtent(2, 24, 3, 19, 1, 11)
    shifted = bridge.image_from_volume_node(node)
    node.ShiftImageDataExtentToZeroStart()
    normalised = bridge.image_from_volume_node(node)
    np.testing.assert_allclose(shifted.GetOrigin(), normalised.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(shifted.GetOrigin(), image.TransformIndexToPhysicalPoint((2, 3, 1)), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(shifted), sitk.GetArrayFromImage(normalised))


# ---------------------------------------------------------------------------- 2. grid transform
@pytest.mark.parametrize("u, tol", [(u_translation, 1e-3), (u_sinusoid, None)])
def test_grid_transform_maps_fixed_to_moving(fixed, scene, u, tol):
    field = field_on(fixed, u)
    node = bridge.grid_transform_node_from_displacement(field, scene, "T")
    from_parent = node.GetTransformFromParent()
    assert from_parent.IsA("vtkOrientedGridTransform") and not from_parent.GetInverseFlag()

    # Grid points: exact (no interpolation).
    idx = np.array([(0, 0, 0), (22, 16, 10), (3, 7, 2), (11, 13, 6), (20, 1, 8)], float)
    x = index_to_lps(fixed, idx)
    np.testing.assert_allclose(transform_points(from_parent, x @ F), (x + u(x)) @ F, atol=1e-9)

    # Points between grid points: FromParent(p) == F @ (x + u(x)), x = F @ p.
    x = index_to_lps(fixed, sample_indices(fixed))
    err = np.linalg.norm(transform_points(from_parent, x @ F) - (x + u(x)) @ F, axis=1).max()
    if tol is None:
        # Trilinear interpolation of the sinusoid: 1/8 sum h_i^2 max|u''| along each grid axis.
        tol = linear_interpolation_bound(fixed.GetSpacing(), fixed.GetDirection(), sinusoid_second_derivative)
        assert 1e-4 < err  # the points really fall between grid points (0.01 mm bound here)
    assert err <= tol, f"max mapping error {err:.3g} mm > {tol:.3g} mm"

    # ToParent is the inverse (moving -> fixed, for display): it undoes the mapping.
    if u is u_translation:
        back = transform_points(node.GetTransformToParent(), (x + u(x)) @ F)
        np.testing.assert_allclose(back, x @ F, atol=1e-3)


def test_outside_the_grid_vtk_extends_the_edge_itk_uses_zero(fixed, scene):
    # A convention difference to know about: beyond the field's grid, Slicer's grid transform
    # keeps the displacement of the nearest grid edge; ITK's DisplacementFieldTransform (the
    # engine, SimpleITK) uses zero displacement.
    field = field_on(fixed, u_translation)
    node = bridge.grid_transform_node_from_displacement(field, scene, "T")
    x = index_to_lps(fixed, np.array([[-6.0, 8.0, 5.0], [11.0, 30.0, 5.0], [11.0, 8.0, -4.0]]))
    np.testing.assert_allclose(transform_points(node.GetTransformFromParent(), x @ F), (x + T) @ F, atol=1e-9)
    itk = displacement_transform(field)
    np.testing.assert_allclose([itk.TransformPoint(tuple(p)) for p in x], x, atol=1e-9)


def test_grid_transform_round_trip(fixed, scene):
    field = field_on(fixed, u_both)
    node = bridge.grid_transform_node_from_displacement(field, scene, "T")
    back = bridge.displacement_from_grid_transform_node(node)
    assert back.GetPixelID() == sitk.sitkVectorFloat64
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(field), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), field.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(back.GetSpacing(), field.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetDirection(), field.GetDirection(), atol=1e-6)
    # Slicer's helper sees the RAS vectors in (k, j, i, component) order.
    np.testing.assert_allclose(slicer.util.arrayFromGridTransform(node),
                               sitk.GetArrayFromImage(field) * np.array([-1.0, -1.0, 1.0]), atol=1e-12)


def test_grid_stored_to_parent_is_sampled_as_from_parent(fixed, scene):
    # A grid stored ToParent (moving -> fixed) with displacement -t: FromParent is +t.
    inverse_grid = bridge.grid_transform_node_from_displacement(field_on(fixed, lambda x: -u_translation(x)),
                                                                scene, "tmp").GetTransformFromParent()
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "T")
    node.SetAndObserveTransformToParent(inverse_grid)
    from_parent = node.GetTransformFromParent()
    from_parent.Update()  # the inverse flag is refreshed on Update()
    assert from_parent.GetInverseFlag()
    back = bridge.displacement_from_grid_transform_node(node)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back).reshape(-1, 3), np.tile(T, (fixed.GetNumberOfPixels(), 1)),
                               atol=1e-3)
    # And any transform can be sampled on a given grid, e.g. a linear one.
    linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "L")
    matrix = np.eye(4)
    matrix[:3, 3] = F @ T  # ToParent translation by t (LPS): FromParent is -t
    linear.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    sampled = bridge.displacement_from_grid_transform_node(linear, reference=fixed)
    np.testing.assert_allclose(sitk.GetArrayFromImage(sampled).reshape(-1, 3), -np.tile(T, (fixed.GetNumberOfPixels(), 1)),
                               atol=1e-9)


# ---------------------------------------------------------------------------- 3. engine files in Slicer
@pytest.mark.parametrize("ext", ["h5", "nii.gz", "nrrd"])
def test_engine_transform_files_read_by_slicer_storage_node(fixed, scene, tmp_path, ext):
    for u in (u_translation, u_sinusoid):
        field = field_on(fixed, u)
        path = write_transform(field, tmp_path / f"{u.__name__}.{ext}")
        storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
        storage.SetFileName(str(path))
        node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", u.__name__)
        assert storage.ReadData(node), f"Slicer could not read {path.name}"
        from_parent = node.GetTransformFromParent()
        assert from_parent.IsA("vtkOrientedGridTransform") and not from_parent.GetInverseFlag()
        # Slicer's ITK reader switches the grid to cubic interpolation (vtkITKTransformConverter).
        assert from_parent.GetInterpolationModeAsString() == "Cubic"

        # The grid Slicer made holds the field (float32 in .nii.gz/.nrrd): same geometry and vectors.
        loaded = bridge.displacement_from_grid_transform_node(node)
        np.testing.assert_allclose(sitk.GetArrayFromImage(loaded), sitk.GetArrayFromImage(field), atol=1e-5)
        np.testing.assert_allclose(loaded.GetOrigin(), field.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(loaded.GetSpacing(), field.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(loaded.GetDirection(), field.GetDirection(), atol=1e-6)

        x = index_to_lps(fixed, sample_indices(fixed, margin=1.0))
        mapped = transform_points(from_parent, x @ F)
        err = np.linalg.norm(mapped - (x + u(x)) @ F, axis=1).max()
        if u is u_translation:
            assert err < 1e-3, f"{ext}: translation maps with error {err:.3g} mm"
        else:
            bound = linear_interpolation_bound(fixed.GetSpacing(), fixed.GetDirection(), sinusoid_second_derivative)
            assert err < bound, f"{ext}: sinusoid maps with error {err:.3g} mm (> {bound:.3g})"


# ---------------------------------------------------------------------------- 4. warping a volume in Slicer
INTENSITY_A = np.array([0.6, 0.8, 0.0])
INTENSITY_B = np.array([-0.3, 0.2, 0.93]) / np.linalg.norm([-0.3, 0.2, 0.93])


def intensity(y, centre):
    """A smooth analytic function of LPS position (mm)."""
    return (100.0 + 30.0 * np.sin(2 * np.pi * (y @ INTENSITY_A) / 40.0)
            + 20.0 * np.cos(2 * np.pi * (y @ INTENSITY_B) / 55.0) + 0.01 * ((y - centre) ** 2).sum(axis=1))


def intensity_bounds(spacing, direction):
    """(trilinear interpolation bound of `intensity` on a grid, max |grad intensity| bound near the centre)."""
    def hess(e):
        return (30.0 * (2 * np.pi / 40.0) ** 2 * float(INTENSITY_A @ e) ** 2
                + 20.0 * (2 * np.pi / 55.0) ** 2 * float(INTENSITY_B @ e) ** 2 + 0.02)
    return linear_interpolation_bound(spacing, direction, hess)


@pytest.fixture()
def moving_case(fixed):
    """A moving image: another size, spacing and orientation, covering the fixed region moved by u."""
    centre = grid_points(fixed).mean(axis=0)
    direction = rotation((-0.3, 1.0, 0.8), 35)
    size, spacing = np.array([48, 60, 34]), np.array([1.1, 0.9, 1.6])
    origin = centre + T - direction @ (spacing * (size - 1) / 2)
    moving = make_image(tuple(int(s) for s in size), tuple(spacing), origin, direction)
    moving = image_like(moving, intensity(grid_points(moving), centre).astype(np.float32))
    return moving, centre


def test_volume_under_grid_transform_resampled_and_hardened_by_slicer(fixed, scene, moving_case):
    moving, centre = moving_case
    field = field_on(fixed, u_both)
    moving_node = bridge.volume_node_from_image(moving, scene, "moving")
    fixed_node = bridge.volume_node_from_image(image_like(fixed, np.zeros(fixed.GetNumberOfPixels(), np.float32)),
                                               scene, "fixed")
    transform_node = bridge.grid_transform_node_from_displacement(field, scene, "T")
    bridge.place_under_transform(moving_node, transform_node)
    assert moving_node.GetParentTransformNode() is transform_node

    bound_f = intensity_bounds(moving.GetSpacing(), moving.GetDirection())
    sitk_warped = sitk.Resample(moving, fixed, displacement_transform(field), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    x = grid_points(fixed)
    truth = intensity(x + u_both(x), centre)
    err_sitk = np.abs(sitk.GetArrayFromImage(sitk_warped).ravel() - truth).max()
    assert err_sitk <= bound_f, (err_sitk, bound_f)

    # (a) Slicer resamples the transformed moving volume onto the fixed volume's grid. At fixed
    # grid points u is exact, so only the trilinear interpolation of the intensity counts.
    resampled_node = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving_node, fixed_node)
    resampled = bridge.image_from_volume_node(resampled_node)
    assert resampled.GetSize() == fixed.GetSize()
    values = sitk.GetArrayFromImage(resampled).ravel()
    err_slicer = np.abs(values - truth).max()
    assert err_slicer <= bound_f, (err_slicer, bound_f)
    # Same trilinear interpolation of the same voxels at the same points: Slicer == SimpleITK.
    assert np.abs(values - sitk.GetArrayFromImage(sitk_warped).ravel()).max() < 1e-3

    # (b) Hardening: MRML resamples the volume on its own lattice (extent recomputed) through
    # FromParent. Between fixed grid points u is interpolated too: error <= bound_f + |grad f| * bound_u.
    bridge.harden(moving_node)
    assert moving_node.GetParentTransformNode() is None
    hardened = bridge.image_from_volume_node(moving_node)
    np.testing.assert_allclose(hardened.GetSpacing(), moving.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(hardened.GetDirection(), moving.GetDirection(), atol=1e-9)
    y = grid_points(hardened)
    index_in_fixed = lps_to_index(fixed, y)
    inside = np.all((index_in_fixed >= 0) & (index_in_fixed <= np.array(fixed.GetSize()) - 1), axis=1)
    assert inside.sum() > 1000
    hardened_values = sitk.GetArrayFromImage(hardened).ravel()[inside]
    bound_u = linear_interpolation_bound(fixed.GetSpacing(), fixed.GetDirection(), sinusoid_second_derivative)
    grad_f = 30.0 * 2 * np.pi / 40.0 + 20.0 * 2 * np.pi / 55.0 + 0.02 * np.linalg.norm(y[inside] - centre, axis=1).max()
    err_harden = np.abs(hardened_values - intensity(y[inside] + u_both(y[inside]), centre)).max()
    assert err_harden <= bound_f + grad_f * bound_u, (err_harden, bound_f, grad_f * bound_u)
    # SimpleITK through the same field onto the hardened lattice agrees at those points.
    sitk_on_lattice = sitk.Resample(moving, hardened, displacement_transform(field), sitk.sitkLinear, 0.0,
                                    sitk.sitkFloat32)
    diff = np.abs(sitk.GetArrayFromImage(sitk_on_lattice).ravel()[inside] - hardened_values).max()
    assert diff < 1e-3, diff


# ---------------------------------------------------------------------------- 5. segmentations
SEGMENTS = {1: ("Liver", (0.8, 0.25, 0.1)), 2: ("Kidney", (0.1, 0.6, 0.9))}


def _segment_state(node):
    segmentation = node.GetSegmentation()
    return [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i).GetName(),
             tuple(round(c, 6) for c in segmentation.GetNthSegment(i).GetColor()))
            for i in range(segmentation.GetNumberOfSegments())]


def _export_with_logic(segmentation_node, reference_node, scene):
    """Independent check: Slicer's own export onto a reference volume -> (array, names in label order)."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "check")
    labelmap.SetAndObserveDisplayNodeID(scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeDisplayNode").GetID())
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    for i in range(segmentation.GetNumberOfSegments()):
        ids.InsertNextValue(segmentation.GetNthSegmentID(i))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, ids, labelmap, reference_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    return slicer.util.arrayFromVolume(labelmap).copy()


def test_segmentation_warped_by_translation(fixed, scene, moving_case):
    moving, _ = moving_case
    # Two spheres in moving space, centred at (fixed-grid points) + t, so they land inside the fixed grid.
    centres_fixed = index_to_lps(fixed, np.array([[7.0, 5.0, 3.0], [15.0, 11.0, 7.0]]))
    centres_moving = centres_fixed + T
    radii = (3.5, 3.0)
    y = grid_points(moving)
    labels = np.zeros(len(y), np.uint8)
    for value, (c, r) in enumerate(zip(centres_moving, radii), start=1):
        labels[np.linalg.norm(y - c, axis=1) <= r] = value
    # The moving segmentation, made with Slicer's own import, then named and coloured.
    labelmap_node = bridge.volume_node_from_image(image_like(moving, labels), scene, "moving labels", labelmap=True)
    bridge._ensure_converter_rules()
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "moving seg")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap_node, seg_node)
    segmentation = seg_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    for i, value in enumerate(sorted(SEGMENTS)):
        segment = segmentation.GetNthSegment(i)
        assert segment.GetLabelValue() == value
        segment.SetName(SEGMENTS[value][0])
        segment.SetColor(*SEGMENTS[value][1])
    state_before = _segment_state(seg_node)
    moving_ref_node = bridge.volume_node_from_image(moving, scene, "moving ref")
    array_before = _export_with_logic(seg_node, moving_ref_node, scene)
    np.testing.assert_array_equal(array_before.ravel(), labels)
    nodes_before = scene.GetNumberOfNodes()

    # The bridge's own export: values and info.
    exported, info = bridge.segmentation_to_labelmap_image(seg_node, moving_ref_node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(exported).ravel(), labels)
    assert [(v, info[v]["name"]) for v in sorted(info)] == [(1, "Liver"), (2, "Kidney")]
    assert scene.GetNumberOfNodes() == nodes_before, "temporary nodes left in the scene"

    field = field_on(fixed, u_translation)
    warped = bridge.warp_segmentation_node(seg_node, field, fixed, scene, "warped seg")
    assert scene.GetNumberOfNodes() == nodes_before + 2  # the segmentation node and its display node

    # Input unchanged (segments, names, colours, voxels).
    assert _segment_state(seg_node) == state_before
    np.testing.assert_array_equal(_export_with_logic(seg_node, moving_ref_node, scene), array_before)

    # Names, colours and segment IDs kept; one shared labelmap layer.
    assert [(i, n) for i, n, _ in _segment_state(warped)] == [(i, n) for i, n, _ in state_before]
    for (_, _, c_after), (_, _, c_before) in zip(_segment_state(warped), state_before):
        np.testing.assert_allclose(c_after, c_before, atol=1e-6)
    assert warped.GetSegmentation().GetNumberOfLayers() == 1

    # Centroids moved by -t (resampling convention), within half a fixed voxel.
    fixed_node = bridge.volume_node_from_image(fixed, scene, "fixed ref")
    warped_array = _export_with_logic(warped, fixed_node, scene)
    x = grid_points(fixed)
    direction = np.array(fixed.GetDirection()).reshape(3, 3)
    for value, c_moving in zip((1, 2), centres_moving):
        mask = warped_array.ravel() == value
        assert mask.sum() > 20
        moved = x[mask].mean(axis=0) - c_moving          # should be -t
        error_voxels = np.abs(direction.T @ (moved + T)) / np.array(fixed.GetSpacing())
        assert np.all(error_voxels <= 0.5), (value, moved, error_voxels)
    # The warped segmentation lives on the fixed grid.
    labels_back, info_back = bridge.segmentation_to_labelmap_image(warped, fixed_node)
    assert {v: d["name"] for v, d in info_back.items()} == {1: "Liver", 2: "Kidney"}
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels_back), warped_array)


def test_segmentation_node_from_labelmap_image_geometry_and_empty_segments(fixed, scene):
    values = np.zeros(tuple(reversed(fixed.GetSize())), np.uint8)
    values[2:5, 3:9, 4:12] = 3
    labels = image_like(fixed, values)
    info = {3: {"id": "seg_c", "name": "C", "color": (0.1, 0.2, 0.3)},
            5: {"id": "seg_e", "name": "Empty", "color": (0.9, 0.9, 0.0)}}
    node = bridge.segmentation_node_from_labelmap_image(labels, scene, "s", info)
    assert _segment_state(node) == [("seg_c", "C", (0.1, 0.2, 0.3)), ("seg_e", "Empty", (0.9, 0.9, 0.0))]
    back, info_back = bridge.segmentation_to_labelmap_image(node)
    # Exported with the reference geometry (the label image's grid), numbered 1..N in segment order.
    assert back.GetSize() == fixed.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), fixed.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(back.GetDirection(), fixed.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), np.where(values == 3, 1, 0))
    assert [info_back[v]["id"] for v in (1, 2)] == ["seg_c", "seg_e"]


def test_closed_surface_segmentation_exported_without_changing_it(fixed, scene):
    bridge._ensure_converter_rules()
    reference = bridge.volume_node_from_image(fixed, scene, "ref")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surface seg")
    node.GetSegmentation().SetSourceRepresentationName(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    centre = grid_points(fixed).mean(axis=0)
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*(F @ centre))
    sphere.SetRadius(5.0)
    sphere.SetThetaResolution(48)
    sphere.SetPhiResolution(48)
    sphere.Update()
    node.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "Ball", (1.0, 0.0, 0.0))
    labels, info = bridge.segmentation_to_labelmap_image(node)
    assert not node.GetSegmentation().ContainsRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())  # converted on a copy
    assert info[1]["name"] == "Ball" and labels.GetSize() == fixed.GetSize()
    mask = sitk.GetArrayFromImage(labels).ravel() == 1
    volume = mask.sum() * np.prod(fixed.GetSpacing())
    assert abs(volume / (4 / 3 * np.pi * 5.0 ** 3) - 1) < 0.15, volume
    assert np.linalg.norm(grid_points(fixed)[mask].mean(axis=0) - centre) < 0.5 * max(fixed.GetSpacing())
