"""The ``mi`` method's pieces: network, model files (cards, checksums, refusals), inference geometry."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import mmreg
from mmreg.errors import InputError, WeightsError
from mmreg.models import ModelCard, list_models, load_model, save_model
from mmreg.networks import DEFAULT_ARCHITECTURE, parameter_count, registration_unet, size_multiple

SMALL = {"channels": [8, 8, 8, 8], "final_conv_channels": [8]}


@pytest.fixture
def model_root(tmp_path, monkeypatch):
    """An empty user model folder and no shipped models."""
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "user"))
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(tmp_path / "shipped"))
    return tmp_path


def _save(root, name="default", arch=SMALL, diffeomorphic=True, spacing=2.0, shift_voxels=None, method="mi"):
    torch.manual_seed(0)
    net = registration_unet(arch)
    if shift_voxels is not None:  # a network whose output is a constant field: zero last weights, bias = shift
        last = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor(shift_voxels, dtype=torch.float32))
    card = ModelCard(name=name, method=method, architecture=dict(DEFAULT_ARCHITECTURE, **arch), spacing_mm=spacing,
                     multiple=size_multiple(dict(DEFAULT_ARCHITECTURE, **arch)), diffeomorphic=diffeomorphic)
    return save_model(root / "user" / method / name, net, card), net


def test_network_is_near_identity_at_init_and_takes_any_multiple():
    net = registration_unet()
    assert 250_000 < parameter_count(net) < 350_000  # VoxelMorph-sized: ~300k
    assert size_multiple(DEFAULT_ARCHITECTURE) == 16
    with torch.no_grad():
        out = net(torch.rand(1, 2, 32, 48, 16))
    assert out.shape == (1, 3, 32, 48, 16)
    assert float(out.abs().max()) < 1e-3
    with torch.no_grad():
        assert registration_unet({"spatial_dims": 2}).eval()(torch.rand(1, 2, 32, 48)).shape == (1, 2, 32, 48)


def test_mind_input_network_reads_descriptors_and_ignores_contrast_inversion():
    # input_features = "mind": the U-Net reads 12 MIND-SSC channels per image, so the field is the same when
    # an image's intensities go through an affine map, inversion included (T1 vs a T2-like contrast).
    arch = dict(SMALL, input_features="mind", mind_radius=1, mind_dilation=1)
    torch.manual_seed(0)
    net = registration_unet(arch).eval()
    first = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)][0]
    assert first.in_channels == 24 and parameter_count(net) == parameter_count(registration_unet(SMALL)) + 22 * 27 * 8
    with torch.no_grad():
        [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)][-1].weight.normal_(0.0, 1.0)
    torch.manual_seed(1)
    fixed, moving = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        field = net(torch.cat([fixed, moving], dim=1))
        inverted = net(torch.cat([fixed, 1.0 - 0.5 * moving], dim=1))
        other = net(torch.cat([fixed, torch.rand(1, 1, 16, 16, 16)], dim=1))
    assert field.shape == (1, 3, 16, 16, 16) and float(field.abs().mean()) > 0.05
    assert float((field - inverted).abs().max()) < 1e-4 * float(field.abs().max())
    assert float((field - other).abs().mean()) > 0.1 * float(field.abs().mean())  # it does read the images
    with pytest.raises(ValueError, match="input_features must be one of"):
        registration_unet(dict(SMALL, input_features="edges"))


def test_intensity_and_mind_network_reads_both_and_widens_a_base_exactly():
    # input_features = "intensity_and_mind": 2 image channels then 2 x 12 MIND-SSC channels. A "mind" or an
    # "intensity" network widened into it (new inputs at zero weight) predicts exactly the base's field.
    from mmreg.networks import first_convolution_key, input_channel_layout, widen_input_weights
    both = dict(SMALL, input_features="intensity_and_mind")
    assert input_channel_layout(both) == {"intensity": slice(0, 2), "mind": slice(2, 26)}
    assert input_channel_layout(dict(both, spatial_dims=2)) == {"intensity": slice(0, 2), "mind": slice(2, 10)}
    torch.manual_seed(0)
    x = torch.rand(1, 2, 16, 16, 16)
    for base_kind in ("mind", "intensity"):
        base = registration_unet(dict(SMALL, input_features=base_kind)).eval()
        with torch.no_grad():
            [m for m in base.modules() if isinstance(m, torch.nn.Conv3d)][-1].weight.normal_(0.0, 1.0)
        wide = registration_unet(both).eval()
        key = first_convolution_key(wide)
        assert key == "network.net.0.0.conv.weight" and wide.state_dict()[key].shape[1] == 26
        wide.load_state_dict(widen_input_weights(base.state_dict(), wide, dict(SMALL, input_features=base_kind), both))
        with torch.no_grad():
            expected = base(x)
            torch.testing.assert_close(wide(x), expected, rtol=0, atol=1e-5)  # float sums over more channels
            assert float(expected.abs().mean()) > 0.05
            new = slice(0, 2) if base_kind == "mind" else slice(2, 26)
            assert float(wide.state_dict()[key][:, new].abs().max()) == 0.0
            # once the new inputs have weight, the field depends on them: with intensity, a contrast inversion
            # of the moving image now changes the field (the MIND-only base ignored it)
            wide.state_dict()[key][:, new].normal_(0.0, 0.5)
            inverted = torch.cat([x[:, :1], 1.0 - 0.5 * x[:, 1:]], dim=1)
            assert float((wide(x) - wide(inverted)).abs().mean()) > 0.01 * float(expected.abs().mean())
    mind = registration_unet(dict(SMALL, input_features="mind"))
    with pytest.raises(ValueError, match="reads mind input features"):
        widen_input_weights(mind.state_dict(), registration_unet(SMALL), dict(SMALL, input_features="mind"), SMALL)


def test_mind_input_model_round_trips_and_registers(model_root):
    arch = dict(SMALL, input_features="mind")
    _save(model_root, "mind", arch=arch, shift_voxels=[0.0, 0.0, 1.0])
    loaded, card = load_model("mi", "mind", registration_unet)
    assert card.architecture["input_features"] == "mind" and hasattr(loaded, "features")
    fixed, moving = _blob_pair((0.0, 0.0, 0.0))
    result = mmreg.register(fixed, moving, method="mi", model="mind", affine=False, threads=1)
    u = sitk.GetArrayFromImage(result.displacement)[8:-8, 8:-8, 8:-8]
    np.testing.assert_allclose(u[..., 0], 2.0, atol=0.05)  # 1 voxel of the 2 mm network grid along x


def test_save_load_round_trip_and_listing(model_root):
    folder, net = _save(model_root)
    loaded, card = load_model("mi", "default", registration_unet)
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), net.eval()(x).numpy(), atol=1e-7)
    assert card.sha256 and card.spacing_mm == 2.0 and card.multiple == 4
    assert [m["name"] for m in list_models("mi")] == ["default"]
    assert [m["name"] for m in mmreg.methods.get_method("mi").models()] == ["default"]
    # by folder path too
    assert load_model("mi", str(folder), registration_unet)[1].name == "default"


def test_bad_model_files_are_refused_with_the_file_and_the_fix(model_root):
    with pytest.raises(WeightsError, match="No trained model for method 'mi'.*mmreg train"):
        load_model("mi", None, registration_unet)
    folder, _ = _save(model_root)
    with pytest.raises(WeightsError, match="available default"):
        load_model("mi", "nonexistent", registration_unet)
    weights = folder / "model.pt"
    good = weights.read_bytes()
    weights.write_bytes(good[:-100] + bytes(100))  # corrupted
    with pytest.raises(WeightsError, match="do not match the checksum"):
        load_model("mi", "default", registration_unet)
    card = json.loads((folder / "model.json").read_text())
    card["sha256"] = ""  # no checksum to catch it: the unreadable file is still refused
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="cannot be read|do not fit"):
        load_model("mi", "default", registration_unet)
    weights.write_bytes(good)
    card["architecture"]["channels"] = [8, 8, 8, 8, 8, 8]  # another architecture than the weights
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="do not fit the architecture"):
        load_model("mi", "default", registration_unet)
    card["method"] = "grad"
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="trained for method 'grad'"):
        load_model("mi", "default", registration_unet)
    (folder / "model.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_model("mi", "default", registration_unet)


def _blob_pair(shift_mm, spacing=(2.0, 2.0, 2.0), size=(48, 40, 32)):
    """fixed(x) = moving(x + t): the moving image is the fixed one moved by -t (so u = +t)."""
    z, y, x = np.mgrid[:size[2], :size[1], :size[0]].astype(float)
    arr = np.exp(-(((x - 24) / 7) ** 2 + ((y - 20) / 6) ** 2 + ((z - 16) / 5) ** 2))
    arr += 0.5 * np.exp(-(((x - 14) / 4) ** 2 + ((y - 26) / 4) ** 2 + ((z - 12) / 4) ** 2))
    fixed = sitk.GetImageFromArray(arr.astype(np.float32))
    fixed.SetSpacing(spacing)
    fixed.SetOrigin((-40.0, -30.0, -20.0))
    moving = sitk.Resample(fixed, fixed, sitk.TranslationTransform(3, [-v for v in shift_mm]), sitk.sitkLinear, 0.0)
    return fixed, moving


def test_network_output_becomes_the_right_physical_displacement(model_root):
    # A "network" that outputs +2 voxels along tensor dim 4 (= x) on the model's 2 mm grid: u = +4 mm along LPS x.
    _save(model_root, "shift", diffeomorphic=False, shift_voxels=[0.0, 0.0, 2.0])
    fixed, moving = _blob_pair((4.0, 0.0, 0.0))
    res = mmreg.register(fixed, moving, method="mi", model="shift", affine=False, threads=1)
    u = sitk.GetArrayFromImage(res.displacement)[8:-8, 8:-8, 8:-8]
    np.testing.assert_allclose(u[..., 0], 4.0, atol=0.1)  # the translation recovered to 0.1 mm
    np.testing.assert_allclose(u[..., 1:], 0.0, atol=0.1)
    f, w = sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(res.warped)
    before = np.abs(f - sitk.GetArrayFromImage(moving))[4:-4, 4:-4, 4:-4].mean()
    after = np.abs(f - w)[4:-4, 4:-4, 4:-4].mean()
    assert after < 0.1 * before


def test_refinement_runs_on_a_grid_twice_as_fine_from_the_network_field(model_root, monkeypatch):
    _save(model_root, "shift", diffeomorphic=False, shift_voxels=[0.0, 0.0, 2.0])  # +4 mm along x at 2 mm
    from mmreg.methods import get_method
    from mmreg.methods import network_method
    fixed, moving = _blob_pair((4.0, 0.0, 0.0))
    method = get_method("mi")
    plain = method.grid_for(fixed, {"model": "shift"})
    fine = method.grid_for(fixed, {"model": "shift", "refinement_steps": 5})
    assert plain.spacing == (2.0, 2.0, 2.0) and fine.spacing == (1.0, 1.0, 1.0)
    assert fine.coarsen(2).spacing == plain.spacing and all(n % 8 == 0 for n in fine.size)
    seen = {}

    def no_change(inputs, **kw):  # stands in for the refinement: records what it was given
        start = kw.pop("init_velocity", None)
        seen.update(kw, grid=inputs.grid, init=start if start is not None else kw["init_ddf"],
                    how="velocity" if start is not None else "composition")
        return seen["init"]
    monkeypatch.setattr(network_method, "instance_optimise", no_change)
    for refine_from in ("velocity", "composition"):
        res = mmreg.register(fixed, moving, method="mi", model="shift", affine=False, threads=1, refinement_steps=5,
                             refine_from=refine_from)
        assert seen["how"] == refine_from
        assert seen["grid"].spacing == (1.0, 1.0, 1.0) and seen["finest_factor"] == 2 and seen["iterations"] == [5]
        # a displacement model: its displacement is the starting velocity; 2 network voxels = 4 fine voxels
        assert float(seen["init"][0, 2].mean()) == pytest.approx(4.0, abs=1e-4)
        u = sitk.GetArrayFromImage(res.displacement)[8:-8, 8:-8, 8:-8]
        np.testing.assert_allclose(u[..., 0], 4.0, atol=0.1)
    with pytest.raises(InputError, match="refine_from must be one of velocity, composition"):
        mmreg.register(fixed, moving, method="mi", model="shift", affine=False, refinement_steps=5, refine_from="x")


def test_network_spacing_sets_the_grid_the_network_reads(model_root, monkeypatch):
    # A displacement "network" that outputs +2 voxels along x whatever it reads, trained at 2 mm: its field in mm
    # is 2 voxels of the grid it reads, so the grid's spacing shows in the displacement.
    folder, _ = _save(model_root, "shift", diffeomorphic=False, shift_voxels=[0.0, 0.0, 2.0])
    from mmreg.methods import get_method, network_method
    method = get_method("mi")
    fixed, moving = _blob_pair((0.0, 0.0, 0.0))

    def x_shift(**options):
        res = mmreg.register(fixed, moving, method="mi", model="shift", affine=False, threads=1, **options)
        return float(np.median(sitk.GetArrayFromImage(res.displacement)[8:-8, 8:-8, 8:-8, 0])), res

    assert x_shift()[0] == pytest.approx(4.0, abs=0.05)  # the training spacing: 2 voxels of 2 mm
    shift, res = x_shift(network_spacing_mm=4.0)  # the option: 2 voxels of 4 mm
    assert shift == pytest.approx(8.0, abs=0.05)
    assert method.grid_for(fixed, {"model": "shift", "network_spacing_mm": 4.0}).spacing == (4.0, 4.0, 4.0)
    # a card's inference spacing becomes the default; the option still overrides it
    card = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps(dict(card, inference_spacing_mm=4.0)))
    assert x_shift()[0] == pytest.approx(8.0, abs=0.05)
    assert x_shift(network_spacing_mm=2.0)[0] == pytest.approx(4.0, abs=0.05)
    info = method.model_info({"model": "shift"})
    assert info["spacing_mm"] == 2.0 and info["network_spacing_mm"] == 4.0
    # with refinement the refinement grid stays at half the training spacing (1 mm); the network reads it pooled
    # by the whole factor nearest its spacing: by default the training spacing (2 mm -> 2: the card's inference
    # spacing is for the network alone), else the option's: 4 mm -> 4, 1 mm -> 1, 1.4 mm -> 1
    assert method.network_pooling({"model": "shift", "refinement_steps": 5}) == 2
    seen = {}

    def no_change(inputs, **kw):  # stands in for the refinement: records what it was given
        seen.update(kw, grid=inputs.grid)
        return kw["init_velocity"]
    monkeypatch.setattr(network_method, "instance_optimise", no_change)
    for spacing, pooling in ((4.0, 4), (1.0, 1), (1.4, 1)):
        options = {"model": "shift", "refinement_steps": 5, "network_spacing_mm": spacing}
        assert method.network_pooling(options) == pooling
        grid = method.grid_for(fixed, options)
        # sizes: the card's multiple times lcm(2, pooling), so both poolings give whole network grids
        assert grid.spacing == (1.0, 1.0, 1.0) and all(n % (card["multiple"] * max(pooling, 2)) == 0 for n in grid.size)
        shift, _ = x_shift(refinement_steps=5, network_spacing_mm=spacing)
        assert seen["grid"].spacing == (1.0, 1.0, 1.0) and seen["finest_factor"] == 2
        # the starting velocity on the 1 mm grid: 2 network voxels = 2 * pooling fine voxels
        assert float(seen["init_velocity"][0, 2].mean()) == pytest.approx(2.0 * pooling, abs=1e-4)
        assert shift == pytest.approx(2.0 * pooling, abs=0.05)
    for bad in (0, -2.0, float("nan"), "2", True):
        with pytest.raises(InputError, match="network_spacing_mm must be a spacing in mm > 0"):
            mmreg.register(fixed, moving, method="mi", model="shift", affine=False, network_spacing_mm=bad)


def test_untrained_model_is_identity_and_refinement_registers(model_root):
    _save(model_root)
    fixed, moving = _blob_pair((4.0, -2.0, 2.0))
    plain = mmreg.register(fixed, moving, method="mi", affine=False, threads=1)
    assert float(np.abs(sitk.GetArrayFromImage(plain.displacement)).max()) < 0.05  # near identity at init
    refined = mmreg.register(fixed, moving, method="mi", affine=False, threads=1, refinement_steps=60)
    u = sitk.GetArrayFromImage(refined.displacement)[12:-12, 12:-12, 10:-10]
    # the refinement (instance optimisation from the network's field) finds the shift: measured 3.98, -1.98, 1.97 mm
    for k, t in enumerate((4.0, -2.0, 2.0)):
        assert abs(float(np.median(u[..., k])) - t) < 0.25
    assert refined.report["quality"]["deformable"]["folding_percent"] == 0.0


def test_model_defines_diffeomorphic_and_options_are_checked(model_root):
    _save(model_root, diffeomorphic=True)
    fixed, moving = _blob_pair((2.0, 0.0, 0.0))
    with pytest.raises(InputError, match="predicts a velocity"):
        mmreg.register(fixed, moving, method="mi", affine=False, diffeomorphic=False)
    for bad, message in ((dict(refinement_steps=-1), "refinement_steps must be an integer >= 0"),
                         (dict(refinement_steps=2.5), "refinement_steps must be an integer >= 0"),
                         (dict(refinement_steps=5, refine_from="velo"), "refine_from must be one of velocity"),
                         (dict(refinement_steps=5, refine_similarity="ncc"), "refine_similarity must be one of mind"),
                         (dict(model="no_such_model"), "no_such_model")):
        progress = []  # refused before any work: no normalisation, no affine
        with pytest.raises((InputError, WeightsError), match=message):
            mmreg.register(fixed, moving, method="mi", progress=lambda f, m: progress.append(m), **bad)
        assert not any("affine" in m for m in progress), (bad, progress)
    # the grid is the model's: 2 mm, sizes multiple of 4 for this small network
    grid = mmreg.methods.get_method("mi").grid_for(fixed, {"model": None, "max_voxels": None})
    assert np.allclose(grid.spacing, 2.0) and all(n % 4 == 0 for n in grid.size)


def test_training_loss_smoothing_before_mi():
    """mi_blur_voxels smooths both images before MI: a different value, gradients still reach the field."""
    from mmreg.methods.mi import training_loss
    torch.manual_seed(0)
    z, y, x = torch.meshgrid(*[torch.arange(24.0)] * 3, indexing="ij")
    base = ((x - 12) ** 2 + (y - 12) ** 2 + (z - 12) ** 2 < 49).float() * 0.6 + 0.2
    fixed = (base + 0.05 * torch.randn(24, 24, 24)).clamp(0, 1)[None, None]
    moving = (base + 0.05 * torch.randn(24, 24, 24)).clamp(0, 1)[None, None]
    field = torch.full((1, 3, 24, 24, 24), 0.3, requires_grad=True)
    plain, _ = training_loss(fixed, moving, field, mi_max_voxels=10**6)
    smooth, parts = training_loss(fixed, moving, field, mi_max_voxels=10**6, mi_blur_voxels=1.0)
    assert parts["mi"] > -float(plain)  # less noise: higher MI between the smoothed images (measured 0.99 vs 0.38)
    smooth.backward()
    assert float(field.grad.abs().sum()) > 0


def test_symmetric_inference_cancels_what_the_network_does_to_every_pair(model_root):
    # A velocity "network" that outputs +2 voxels along x whatever the pair (a pair-independent bias):
    # alone it moves every pair by 4 mm; symmetric inference, (v(f, m) - v(m, f)) / 2, cancels it exactly.
    _save(model_root, "bias", diffeomorphic=True, shift_voxels=[0.0, 0.0, 2.0])
    fixed, moving = _blob_pair((0.0, 0.0, 0.0))
    plain = mmreg.register(fixed, moving, method="mi", model="bias", affine=False, threads=1)
    u = sitk.GetArrayFromImage(plain.displacement)[8:-8, 8:-8, 8:-8]
    np.testing.assert_allclose(u[..., 0], 4.0, atol=0.1)
    sym = mmreg.register(fixed, moving, method="mi", model="bias", affine=False, threads=1, symmetric=True)
    assert float(np.abs(sitk.GetArrayFromImage(sym.displacement)).max()) < 1e-4
    assert sym.report["options"]["symmetric"] is True


def test_symmetric_inference_is_inverse_consistent(model_root):
    # An untrained network with non-zero output weights: swapping the images negates the symmetric velocity,
    # so the two displacements are inverses of each other: u_fm(x) + u_mf(x + u_fm(x)) = 0.
    torch.manual_seed(0)
    net = registration_unet(SMALL)
    with torch.no_grad():
        [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)][-1].weight.normal_(0.0, 3.0)
    arch = dict(DEFAULT_ARCHITECTURE, **SMALL)
    save_model(model_root / "user" / "mi" / "random", net,
               ModelCard(name="random", method="mi", architecture=arch, spacing_mm=2.0, multiple=size_multiple(arch),
                         diffeomorphic=True))
    fixed, moving = _blob_pair((4.0, -2.0, 2.0))
    inner = [fixed.TransformIndexToPhysicalPoint((i, j, k)) for i in range(10, 38, 6) for j in range(10, 30, 6)
             for k in range(8, 24, 5)]

    def round_trip_error(**options):  # mm: fixed -> moving by (f, m), then back by (m, f)
        a = mmreg.register(fixed, moving, method="mi", model="random", affine=False, threads=1, **options)
        b = mmreg.register(moving, fixed, method="mi", model="random", affine=False, threads=1, **options)
        size = float(np.abs(sitk.GetArrayFromImage(a.displacement)).max())
        composite = sitk.CompositeTransform([b.transform, a.transform])  # a first, then b
        return size, max(np.linalg.norm(np.subtract(composite.TransformPoint(p), p)) for p in inner)
    size, plain = round_trip_error()
    size_sym, sym = round_trip_error(symmetric=True)
    assert size_sym > 1.0  # mm: not trivially zero
    # measured: 0.09 mm with symmetric (resampling of the fields), 17 mm without (a 9 mm field)
    assert sym < 0.15 and plain > 1.0 and size > 1.0


def test_symmetric_needs_a_velocity_model(model_root):
    _save(model_root, "shift", diffeomorphic=False, shift_voxels=[0.0, 0.0, 2.0])
    fixed, moving = _blob_pair((2.0, 0.0, 0.0))
    with pytest.raises(InputError, match="symmetric=true needs a model that predicts a velocity"):
        mmreg.register(fixed, moving, method="mi", model="shift", affine=False, symmetric=True)
    with pytest.raises(InputError, match="symmetric must be true or false"):
        mmreg.register(fixed, moving, method="mi", model="shift", affine=False, symmetric="yes")
