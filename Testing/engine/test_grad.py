"""Method ``grad``: gradient-magnitude maps, the dual-branch network and its fusions, the MIND objective
with the gradient-branch terms, the gate maps as extra outputs, and training with ``mmreg train``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import mmreg
from mmreg.errors import InputError
from mmreg.manifest import write_manifest
from mmreg.methods.grad import split_output, training_loss
from mmreg.models import ModelCard, save_model
from mmreg.networks import DEFAULT_ARCHITECTURE, DEFAULT_GRAD_ARCHITECTURE, GRAD_VARIANTS, gradient_magnitude, gradnet, parameter_count
from mmreg.training import config_for_manifest, config_from_dict, train

SMALL = {"channels": [8, 8, 8, 8, 8, 8, 8, 8], "final_conv_channels": [8]}


@pytest.fixture
def model_root(tmp_path, monkeypatch):
    """An empty user model folder and no shipped models."""
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "user"))
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(tmp_path / "shipped"))
    return tmp_path


def _phantom(shape=(32, 32, 32), centre_shift=(0, 0, 0), seed=0, contrast=(0.05, 0.5, 0.9)):
    """Two nested ellipsoids with smooth texture, intensities ``contrast`` (background, shell, core)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    z, y, x = zz - centre_shift[0], yy - centre_shift[1], xx - centre_shift[2]
    r_out = (z / 11) ** 2 + (y / 10) ** 2 + (x / 12) ** 2
    r_in = (z / 6) ** 2 + (y / 5) ** 2 + (x / 6) ** 2
    tex = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(rng.random(shape).astype(np.float32)), 2.0))
    bg, shell, core = contrast
    img = np.where(r_in < 1, core, np.where(r_out < 1, shell, bg)) + 0.1 * (tex - tex.mean())
    return img.astype(np.float32)


def _image(arr, spacing=2.0) -> sitk.Image:
    im = sitk.GetImageFromArray(arr.astype(np.float32) * 1000.0)
    im.SetSpacing([spacing] * 3)
    return im


# ----------------------------------------------------------------------------- gradient maps and network


def test_gradient_magnitude_of_a_ramp_is_its_slope_and_normalised_maps_lie_in_0_1():
    z, y, x = np.meshgrid(np.arange(12), np.arange(14), np.arange(16), indexing="ij")
    ramp = torch.from_numpy((0.03 * x + 0.04 * y).astype(np.float32))[None, None]  # slope 0.05 per voxel
    g = gradient_magnitude(ramp, normalise=False)
    assert g.shape == ramp.shape
    assert float(g[0, 0, 2:-2, 2:-2, 2:-2].mean()) == pytest.approx(0.05, abs=1e-5)
    edge = torch.zeros(1, 1, 16, 16, 16)
    edge[..., 8:] = 1.0  # a step along the last axis: the map is high on the edge only
    n = gradient_magnitude(edge)
    assert float(n.min()) >= 0.0 and float(n.max()) == pytest.approx(1.0)
    assert float(n[..., 7:9].mean()) > 0.9 and float(n[..., :6].max()) < 1e-3
    assert gradient_magnitude(torch.rand(1, 1, 20, 24)).shape == (1, 1, 20, 24)  # 2-D


@pytest.mark.parametrize("variant", GRAD_VARIANTS)
def test_every_variant_starts_near_the_identity_with_its_output_layout(variant):
    torch.manual_seed(0)
    net = gradnet(dict(SMALL, variant=variant))
    x = torch.rand(1, 2, 32, 48, 32)
    out = net(x)
    dual = variant in ("gated", "average")
    assert out.shape == (1, 6 if dual else 3, 32, 48, 32) and net.output_channels == out.shape[1]
    assert float(out.abs().max()) < 1e-2
    d = net.forward_details(x)
    assert (d["gradient_field"] is not None) == dual and (d["image_gate"] is not None) == (variant == "gated")
    assert gradnet(dict(SMALL, variant=variant, spatial_dims=2))(torch.rand(1, 2, 32, 32)).shape[1] == (4 if dual else 2)


def test_gated_fusion_starts_as_the_average_and_its_gates_choose_a_branch():
    torch.manual_seed(0)
    net = gradnet(dict(SMALL, variant="gated"))
    x = torch.rand(1, 2, 16, 16, 16)
    d = net.forward_details(x)
    assert torch.allclose(d["image_gate"], torch.full_like(d["image_gate"], 0.5))
    # gates 0.5 and the 1x1x1 mix [I, I]: phi_ig = (phi_i + phi_g) / 2, the "average" variant
    assert torch.allclose(d["field"], 0.5 * (d["image_field"] + d["gradient_field"]), atol=1e-9)
    with torch.no_grad():  # close the image gate, open the gradient gate: phi_ig = phi_g
        net.gate.bias.copy_(torch.tensor([-30.0] * 3 + [30.0] * 3))
    d = net.forward_details(x)
    assert torch.allclose(d["field"], d["gradient_field"], atol=1e-9)
    assert float(d["gradient_gate"].min()) > 0.999 and float(d["image_gate"].max()) < 1e-3
    # the baselines are half the size: one VoxelMorph branch instead of two
    assert parameter_count(gradnet({"variant": "vm"})) * 2 < parameter_count(gradnet({"variant": "gated"})) + 2000
    with pytest.raises(ValueError, match="variant must be one of"):
        gradnet({"variant": "max"})


def test_loss_is_lowest_at_the_true_displacement_across_contrasts_and_weighs_the_gradient_branch():
    fixed = torch.from_numpy(_phantom())[None, None]
    other = torch.from_numpy(_phantom(contrast=(0.9, 0.2, 0.6)))[None, None]  # another "modality" of the same anatomy
    moving = torch.roll(other, shifts=2, dims=4)  # moving(x) = other(x - 2 voxels): u = +2 voxels on the last axis
    true = torch.zeros(1, 3, 32, 32, 32)
    true[:, 2] = 2.0
    l0, p0 = training_loss(fixed, moving, torch.zeros_like(true))
    l1, p1 = training_loss(fixed, moving, true)
    assert float(l1) < 0.5 * float(l0) and p1["mind"] < 0.5 * p0["mind"], (p0, p1)
    # two branches: phi_g enters through the gradient-map term (alpha) and its own smoothness (gamma)
    both = torch.cat([true, true], dim=1)
    lg, pg = training_loss(fixed, moving, both, gradient_weight=0.5, gradient_smoothness=0.5)
    lbad, pbad = training_loss(fixed, moving, torch.cat([true, torch.zeros_like(true)], dim=1), gradient_weight=0.5)
    assert pg["gradient_mind"] < 0.5 * pbad["gradient_mind"] and float(lg) < float(lbad)
    assert float(training_loss(fixed, moving, both, gradient_weight=0.0, gradient_smoothness=0.0)[0]) == pytest.approx(
        float(l1), rel=1e-6)
    phi, phi_g = split_output(both, 3)
    assert phi.shape[1] == 3 and phi_g.shape[1] == 3 and split_output(true, 3)[1] is None


# ----------------------------------------------------------------------------- inference and gate maps


def _save_constant_model(root, shift_voxels, variant="gated", name="grad_test", spacing=2.0, gradient_trust=0.0):
    """A model whose branches predict constant fields: the image branch ``shift_voxels``, the gradient branch 0;
    ``gradient_trust`` is the gradient gate's bias (0: gates 0.5)."""
    net = gradnet(dict(SMALL, variant=variant))
    with torch.no_grad():
        branches = [net.image_branch] + ([net.gradient_branch] if net.dual else [])
        for k, branch in enumerate(branches):
            last = [m for m in branch.modules() if isinstance(m, torch.nn.Conv3d)][-1]
            last.weight.zero_()
            last.bias.copy_(torch.tensor(shift_voxels if k == 0 else [0.0, 0.0, 0.0]))
        if variant == "gated":
            net.gate.bias.copy_(torch.tensor([30.0] * 3 + [gradient_trust] * 3))
    arch = dict(DEFAULT_GRAD_ARCHITECTURE, **SMALL, variant=variant)
    card = ModelCard(name=name, method="grad", architecture=arch, spacing_mm=spacing, multiple=16, diffeomorphic=False)
    return save_model(root / "user" / "grad" / name, net, card)


def test_registration_gives_the_fused_physical_displacement_and_the_gate_maps(model_root):
    fixed = _image(_phantom((24, 30, 36)))
    _save_constant_model(model_root, [0.0, 0.0, 2.0], gradient_trust=-30.0)  # image gate 1, gradient gate ~0
    r = mmreg.register(fixed, fixed, method="grad", affine=False, threads=2)
    u = sitk.GetArrayFromImage(r.displacement)
    centre = u[8:16, 10:20, 12:24].reshape(-1, 3).mean(0)
    assert np.allclose(centre, [4.0, 0.0, 0.0], atol=0.05), centre  # 2 voxels of the 2 mm grid along x = 4 mm
    assert sorted(r.extra_images) == ["gradient_gate", "image_gate"] == sorted(r.report["extra_images"])
    ig = sitk.GetArrayViewFromImage(r.extra_images["image_gate"])[4:-4, 4:-4, 4:-4]
    gg = sitk.GetArrayViewFromImage(r.extra_images["gradient_gate"])[4:-4, 4:-4, 4:-4]
    assert float(ig.min()) > 0.99 and float(gg.max()) < 0.01
    assert r.extra_images["image_gate"].GetSize() == fixed.GetSize()
    # the average fusion: half of the image branch's field, and no gate maps
    _save_constant_model(model_root, [0.0, 0.0, 2.0], variant="average", name="grad_avg")
    r = mmreg.register(fixed, fixed, method="grad", model="grad_avg", affine=False, threads=2)
    centre = sitk.GetArrayFromImage(r.displacement)[8:16, 10:20, 12:24].reshape(-1, 3).mean(0)
    assert np.allclose(centre, [2.0, 0.0, 0.0], atol=0.05), centre
    assert r.extra_images == {}


def test_grad_is_listed_with_mind_refinement_and_a_default_model():
    assert "grad" in mmreg.method_names()
    method = mmreg.get_method("grad")
    assert method.default_options()["refine_similarity"] == "mind" and method.default_model == "grad_mr_gated"
    assert "multi" in method.modalities


# ----------------------------------------------------------------------------- training


def test_training_on_multimodal_pairs_lowers_the_mind_loss_and_the_model_registers(model_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MMREG_CACHE", str(tmp_path / "cache"))
    rows = []
    for k in range(4):  # fixed in one contrast, moving in another and displaced
        a = _phantom(seed=k)
        b = _phantom(centre_shift=(1.0 * (k % 2) - 0.5, 1.0, -1.5 + k), seed=k, contrast=(0.9, 0.2, 0.6))
        sitk.WriteImage(_image(a), str(tmp_path / f"f{k}.nii.gz"))
        sitk.WriteImage(_image(b), str(tmp_path / f"m{k}.nii.gz"))
        rows.append({"fixed": str(tmp_path / f"f{k}.nii.gz"), "moving": str(tmp_path / f"m{k}.nii.gz"),
                     "split": "validation" if k == 3 else ""})
    write_manifest(tmp_path / "pairs.csv", rows)
    cfg = config_for_manifest("grad", tmp_path / "pairs.csv", output=tmp_path / "model", steps=40, threads=2,
                              spacing_mm=2.0, augment=False)
    # the method's own defaults where the user gave none: the paper's abdominal weights (alpha, beta, gamma)
    assert (cfg.gradient_weight, cfg.smoothness, cfg.gradient_smoothness) == (0.5, 1.0, 0.5)
    cfg.architecture = dict(SMALL, variant="gated")
    cfg.learning_rate, cfg.validation_every, cfg.data.prealign = 3e-3, 20, "none"
    cfg.smoothness, cfg.gradient_smoothness = 0.1, 0.05  # the shipped recipes' weights (docs/grad.md)
    result = train(cfg)
    first, best = result.history["validation"][0], result.history["best"]
    # measured: validation loss 0.0600 -> 0.0585 in 40 steps (the networks learn slowly at first; docs/grad.md)
    assert best["mean_loss"] < 0.985 * first["mean_loss"], (first, best)
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert card["method"] == "grad" and card["architecture"]["variant"] == "gated"
    assert card["training"]["config"]["gradient_weight"] == 0.5
    r = mmreg.register(str(tmp_path / "f3.nii.gz"), str(tmp_path / "m3.nii.gz"), method="grad",
                       model=str(tmp_path / "model"), affine=False, threads=2)
    gate = sitk.GetArrayViewFromImage(r.extra_images["gradient_gate"])
    assert 0.0 < float(gate.mean()) < 1.0


def test_a_teacher_of_another_method_teaches_the_fused_field(model_root, tmp_path, monkeypatch):
    """teacher_model = "mi:NAME" (or an mi model folder): a registration network of another method teaches a grad
    network's fused field phi_ig (the first three of its six output channels): the teacher term falls and the
    student's phi_ig ends closer to the teacher's constant velocity than without the teacher. The metric (no
    registration network) is refused, naming the key."""
    from mmreg.models import load_model  # noqa: PLC0415
    from mmreg.networks import registration_unet  # noqa: PLC0415
    from mmreg.training import load_teacher, taught_field, teacher_reference  # noqa: PLC0415

    monkeypatch.setenv("MMREG_CACHE", str(tmp_path / "cache"))
    velocity = (0.6, -0.4, 0.3)  # voxels of the training grid
    teacher = registration_unet(dict(SMALL))
    last = [m for m in teacher.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(velocity))
    save_model(model_root / "user" / "mi" / "constant", teacher,
               ModelCard(name="constant", method="mi", architecture=dict(DEFAULT_ARCHITECTURE, **SMALL), spacing_mm=2.0,
                         multiple=16))
    rows = []
    for k in range(3):
        a, b = _phantom(seed=k), _phantom(centre_shift=(0.0, 1.0, -1.0 + k), seed=k, contrast=(0.9, 0.2, 0.6))
        sitk.WriteImage(_image(a), str(tmp_path / f"f{k}.nii.gz"))
        sitk.WriteImage(_image(b), str(tmp_path / f"m{k}.nii.gz"))
        rows.append({"fixed": str(tmp_path / f"f{k}.nii.gz"), "moving": str(tmp_path / f"m{k}.nii.gz"),
                     "split": "validation" if k == 2 else ""})
    write_manifest(tmp_path / "pairs.csv", rows)

    def run(out, teacher_model=None):
        cfg = config_for_manifest("grad", tmp_path / "pairs.csv", output=tmp_path / out, steps=15, threads=2,
                                  spacing_mm=2.0, augment=False)
        cfg.architecture = dict(SMALL, variant="gated")
        cfg.learning_rate, cfg.validation_every, cfg.checkpoint_every, cfg.data.prealign = 1e-3, 0, 0, "none"
        cfg.final_model, cfg.seed = "last", 3
        cfg.teacher_model, cfg.teacher_weight = teacher_model, 5.0
        return cfg, train(cfg)

    cfg, taught = run("taught", "mi:constant")
    assert teacher_reference(cfg, "mi:constant") == ("mi", "constant")
    assert teacher_reference(cfg, str(model_root / "user" / "mi" / "constant"))[0] == "mi"
    assert teacher_reference(cfg, "grad_mr_gated") == ("grad", "grad_mr_gated")
    assert taught.history["teacher"][-1] < 0.5 * taught.history["teacher"][0], taught.history["teacher"]
    _, alone = run("alone")
    pair = torch.cat([torch.from_numpy(_phantom(seed=0))[None, None],
                      torch.from_numpy(_phantom(centre_shift=(0.0, 1.0, -1.0), seed=0))[None, None]], 1)

    def error(result):
        net, _ = load_model("grad", result.model_dir, gradnet)
        with torch.no_grad():
            phi = taught_field(net(pair), torch.zeros(1, 3, 1, 1, 1))
        return float(torch.mean((phi - torch.tensor(velocity).reshape(1, 3, 1, 1, 1)) ** 2))
    assert error(taught) < 0.3 * error(alone), (error(taught), error(alone))
    with pytest.raises(InputError, match="teacher_model: method 'metric' has no registration network"):
        load_teacher(cfg, torch.device("cpu"), ref="metric:metric_mr")
    with pytest.raises(InputError, match="do not teach each other"):
        taught_field(torch.zeros(1, 4, 2, 2, 2), torch.zeros(1, 3, 2, 2, 2))


def test_bad_grad_configs_name_the_key():
    with pytest.raises(InputError, match="architecture.variant must be one of"):
        config_from_dict({"method": "grad", "architecture": {"variant": "max"}})
    with pytest.raises(InputError, match="gradient_weight and gradient_smoothness must be >= 0"):
        config_from_dict({"method": "grad", "gradient_weight": -1})
    with pytest.raises(InputError, match="template_modalities may hold"):
        config_from_dict({"method": "grad", "data": {"template_modalities": ["US"]}})
    cfg = config_from_dict({"method": "grad", "data": {"template_modalities": ["CT", "T1"],
                                                        "sources": {"template_t1": 1.0, "t1_template": 1.0}}})
    assert cfg.data.template_modalities == ["CT", "T1"] and cfg.full_architecture()["kind"] == "gradnet"


def test_grad_networks_started_from_mi_brain_predict_its_fields():
    """docs/scripts/grad_init_from_mi.py (the "Starting from mi_brain" experiment of docs/grad.md): a VM network
    holding the shipped mi_brain's weights predicts exactly mi_brain's velocity, and a fresh gated one the average
    of mi_brain on the images and on the gradient maps (gates 0.5, fusion [I, I])."""
    import importlib.util  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from mmreg.methods.grad import GradRegistration  # noqa: PLC0415
    from mmreg.methods.mi import MIRegistration  # noqa: PLC0415
    from mmreg.models import load_model  # noqa: PLC0415

    try:
        mi_net, card = load_model("mi", "mi_brain", MIRegistration.build_network, "cpu")
    except InputError:
        pytest.skip("the shipped mi_brain model is not installed")
    script = Path(__file__).resolve().parents[2] / "docs" / "scripts" / "grad_init_from_mi.py"
    spec = importlib.util.spec_from_file_location("grad_init_from_mi", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fixed = torch.from_numpy(_phantom((32, 32, 32)))[None, None]
    moving = torch.from_numpy(_phantom((32, 32, 32), centre_shift=(2, -1, 1), seed=1, contrast=(0.1, 0.8, 0.3)))[None, None]
    pair = torch.cat([fixed, moving], dim=1)
    arch = {k: card.architecture[k] for k in ("channels", "final_conv_channels")}
    with torch.no_grad():
        expected = mi_net(pair)
        on_gradients = mi_net(torch.cat([gradient_magnitude(fixed), gradient_magnitude(moving)], dim=1))
        assert float(expected.abs().max()) > 0.05  # mi_brain moves this pair: the comparison means something
        vm = GradRegistration.build_network(dict(arch, kind="gradnet", variant="vm"))
        vm.load_state_dict(module.grad_weights_from_mi("vm"))
        assert torch.allclose(vm(pair), expected, atol=1e-6)
        gated = GradRegistration.build_network(dict(arch, kind="gradnet", variant="gated"))
        gated.load_state_dict(module.grad_weights_from_mi("gated"))
        fused = gated.forward_details(pair)["field"]
        assert torch.allclose(fused, 0.5 * (expected + on_gradients), atol=1e-5)
    with pytest.raises(ValueError, match="vm_concat"):
        module.grad_weights_from_mi("vm_concat")
