"""instance_optimise as the refinement step of learned methods, in 3-D and 2-D, on grid tensors."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from mmreg.grid import NetworkGrid
from mmreg.methods import GridInputs
from mmreg.methods.optimize import instance_optimise
from mmreg.spatial import warp


def _blobs(shape, seed=0):
    """Smooth random blobs in [0, 1], a (1, 1, *shape) tensor."""
    rng = np.random.default_rng(seed)
    img = sitk.GetImageFromArray(rng.random(shape).astype(np.float32))
    img = sitk.SmoothingRecursiveGaussian(img, 2.0)
    arr = sitk.GetArrayFromImage(img)
    arr = (arr - arr.min()) / (arr.max() - arr.min())
    return torch.from_numpy(arr)[None, None]


def _inputs(fixed, moving):
    shape = fixed.shape[2:]
    size = tuple(reversed(shape)) + ((1,) if len(shape) == 2 else ())
    grid = NetworkGrid(size, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    ones = torch.ones_like(fixed)
    return GridInputs(grid, fixed, moving, ones, ones, torch.device("cpu"))


@pytest.mark.parametrize("shape", [(32, 32, 32), (48, 48)])
def test_refinement_completes_a_partial_prediction(shape):
    """A 'network prediction' of half the true translation is refined to the whole translation."""
    fixed = _blobs(shape)
    ndim = len(shape)
    true = torch.zeros((1, ndim) + shape)
    true[:, -1] = 2.0   # 2 voxels along the last tensor axis (x)
    true[:, 0] = -1.5   # and along the first
    moving = warp(fixed, -true)  # moving(x) = fixed(x - t): the answer is u = +t (resampling convention)
    inputs = _inputs(fixed, moving)
    init = 0.5 * true
    kw = dict(levels=2, finest_factor=1, iterations=(30, 30))
    refined = instance_optimise(inputs, init_ddf=init, **kw)
    inner = tuple(slice(6, -6) for _ in shape)
    err_init = (init - true)[(slice(None), slice(None)) + inner].norm(dim=1).mean().item()
    err = (refined - true)[(slice(None), slice(None)) + inner].norm(dim=1).mean().item()
    # Measured: init error 1.25 voxels -> about 0.1-0.2 voxels after refinement.
    assert err < 0.3 * err_init
    assert refined.shape == init.shape


def test_mind_and_mi_both_recover_a_contrast_inverted_translation():
    fixed = _blobs((32, 32, 32), seed=3)
    true = torch.zeros((1, 3, 32, 32, 32))
    true[:, 1] = 2.0
    moving = 1.0 - warp(fixed, -true)  # other "modality": inverted contrast
    inputs = _inputs(fixed, moving)
    inner = (slice(None), slice(None)) + (slice(6, -6),) * 3
    for similarity in ("mind", "mi"):
        ddf = instance_optimise(inputs, similarity=similarity, levels=2, finest_factor=1, iterations=(40, 30))
        err = (ddf - true)[inner].norm(dim=1).mean().item()
        assert err < 0.5 * 2.0, (similarity, err)  # less than half the 2-voxel motion remains


def test_a_few_refinement_steps_keep_an_already_good_field():
    """Adam's first steps move every voxel by about a whole step whatever its gradient: without the
    warm-up, two MSE steps after a nearly right 'network prediction' (0.2 voxels off) push it about a
    voxel off (measured 1.16); with the default warm-up (5 steps) it improves (measured 0.14). A long
    refinement still completes a partial field."""
    fixed = _blobs((32, 32, 32), seed=5)
    true = torch.zeros((1, 3, 32, 32, 32))
    true[:, 2] = 2.0
    moving = warp(fixed, -true)
    inputs = _inputs(fixed, moving)
    inner = (slice(None), slice(None)) + (slice(6, -6),) * 3
    kw = dict(similarity="mse", levels=1, finest_factor=2, iterations=[2])

    def error(ddf):
        return (ddf - true)[inner].norm(dim=1).mean().item()

    start = error(0.9 * true)
    cold = error(instance_optimise(inputs, init_ddf=0.9 * true, warmup_steps=0, **kw))
    warm = error(instance_optimise(inputs, init_ddf=0.9 * true, **kw))
    assert start == pytest.approx(0.2, abs=0.01)
    assert cold > 0.8 and warm < start, (start, cold, warm)
    half = error(instance_optimise(inputs, init_ddf=0.5 * true, **dict(kw, iterations=[40])))
    assert half < 0.3, half  # the warm-up does not stop a refinement from completing a partial field
    with pytest.raises(Exception, match="warmup_steps must be >= 0"):
        instance_optimise(inputs, init_ddf=true.clone(), warmup_steps=-1, **kw)


def test_integrating_on_a_coarser_grid_recovers_a_smooth_deformation_as_well():
    """The velocity integrated at half resolution (the default, ``integration_factor=2``) recovers a
    smooth non-uniform deformation about as well as integrating on the level's grid, without folding;
    sizes that do not divide fall back to the full grid, and a bad factor is refused."""
    from mmreg.methods.optimize import _integration_factor
    from mmreg.training import _folding_percent

    shape = (32, 32, 32)
    fixed = _blobs(shape, seed=7)
    z, y, x = torch.meshgrid(*[torch.linspace(0, 3.14159, s) for s in shape], indexing="ij")
    true = torch.stack([1.5 * torch.sin(y) * torch.sin(x), torch.zeros_like(x), 2.0 * torch.sin(z)])[None]
    moving = warp(fixed, -true)  # approximately: moving(x) = fixed(x - t(x))
    inputs = _inputs(fixed, moving)
    inner = (slice(None), slice(None)) + (slice(6, -6),) * 3
    kw = dict(similarity="lncc", levels=2, finest_factor=1, iterations=(40, 40))
    errors = {}
    for factor in (1, 2):
        ddf = instance_optimise(inputs, integration_factor=factor, **kw)
        errors[factor] = (ddf - true)[inner].norm(dim=1).mean().item()
        assert _folding_percent(ddf) == 0.0, factor
    start = true[inner].norm(dim=1).mean().item()
    # measured: 2.0 voxels mean error at the start -> 0.18 (factor 1) and 0.17 (factor 2)
    assert errors[2] < 0.15 * start and errors[2] < errors[1] + 0.05, (start, errors)
    assert _integration_factor((32, 32, 32), 2) == 2
    assert _integration_factor((32, 33, 32), 2) == 1  # an odd axis
    assert _integration_factor((32, 6, 32), 2) == 1  # an axis left under 4 voxels
    for bad in (0, 1.5, -2):
        with pytest.raises(Exception, match="integration_factor must be an integer >= 1"):
            instance_optimise(inputs, integration_factor=bad, **kw)


def test_refinement_can_start_at_a_velocity_and_refuses_ambiguous_starts():
    """``init_velocity`` is where the optimised field starts (a diffeomorphic network's velocity): a
    velocity 0.1 off is kept by a short refinement and improved, half of it is completed by a long one
    (for a translation, velocity = displacement). Both starts at once, or a field of the wrong shape,
    are refused."""
    from mmreg.errors import InputError

    fixed = _blobs((32, 32, 32), seed=5)
    true = torch.zeros((1, 3, 32, 32, 32))
    true[:, 2] = 2.0
    true[:, 0] = -1.0
    moving = warp(fixed, -true)
    inputs = _inputs(fixed, moving)
    inner = (slice(None), slice(None)) + (slice(6, -6),) * 3
    kw = dict(similarity="mse", levels=1, finest_factor=2)

    def error(ddf):
        return (ddf - true)[inner].norm(dim=1).mean().item()

    start = error(0.9 * true)
    short = error(instance_optimise(inputs, init_velocity=0.9 * true, iterations=[3], **kw))
    long = error(instance_optimise(inputs, init_velocity=0.5 * true, iterations=[40], **kw))
    zero = error(instance_optimise(inputs, iterations=[3], **kw))
    # measured: 0.22 voxels at the start -> 0.16 after 3 steps (0.95 from zero); half of it -> 0.07 after 40
    assert short < start and zero > 5 * short, (start, short, zero)
    assert long < 0.3, long
    with pytest.raises(InputError, match="not both"):
        instance_optimise(inputs, init_velocity=true, init_ddf=true, iterations=[3], **kw)
    for name in ("init_velocity", "init_ddf"):
        with pytest.raises(InputError, match=f"{name} must have shape"):
            instance_optimise(inputs, **{name: true[:, :, :16]}, iterations=[3], **kw)
