"""Method ``disentangled``: the representation disentangling model (RDM), its losses and training stage,
the registration-stage objective through the frozen RDM, the method's field and translated image, and
the configs' checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import mmreg
from mmreg.errors import InputError
from mmreg.manifest import write_manifest
from mmreg.methods.disentangled import (DisentangledNet, load_rdm_state, random_crop, training_loss,
                                        translation_quality)
from mmreg.models import ModelCard, save_model
from mmreg.rdm import DEFAULT_RDM_ARCHITECTURE, Discriminator, RepresentationModel, adaptive_instance_norm, rdm_losses
from mmreg.training import config_from_dict, train

TINY = {"rdm": {"channels": 4, "style_dim": 4, "mlp_channels": 16, "discriminator_channels": 4},
        "registration": {"channels": [8, 8, 8, 8, 8, 8, 8, 8], "final_conv_channels": [8]}}
WEIGHTS = {"reconstruction": 10.0, "latent": 1.0, "cycle": 10.0, "adversarial": 1.0, "paired": 10.0}


@pytest.fixture
def model_root(tmp_path, monkeypatch):
    """An empty user model folder and no shipped models."""
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "user"))
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(tmp_path / "shipped"))
    return tmp_path


def _phantom(shape=(24, 24, 24), shift=(0.0, 0.0, 0.0), seed=0, contrast=(0.05, 0.5, 0.9)):
    """Two nested ellipsoids with smooth texture; ``contrast`` = (background, shell, core) intensities."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    z, y, x = (g - s for g, s in zip(grids, shift))
    r_out = (z / 9) ** 2 + (y / 8) ** 2 + (x / 10) ** 2
    r_in = (z / 5) ** 2 + (y / 4) ** 2 + (x / 5) ** 2
    tex = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(rng.random(shape).astype(np.float32)), 2.0))
    bg, shell, core = contrast
    return (np.where(r_in < 1, core, np.where(r_out < 1, shell, bg)) + 0.1 * (tex - tex.mean())).astype(np.float32)


T2_LIKE = (0.9, 0.2, 0.6)  # an inverted contrast: background bright, shell dark


def _t(arr) -> torch.Tensor:
    return torch.from_numpy(arr)[None, None]


def _image(arr, spacing=2.0) -> sitk.Image:
    im = sitk.GetImageFromArray(arr * 1000.0)
    im.SetSpacing([spacing] * 3)
    return im


# ----------------------------------------------------------------------------- the RDM


def test_rdm_encodes_content_and_style_and_translates_in_2d_and_3d():
    for nd, shape in ((3, (16, 24, 16)), (2, (32, 24))):
        rdm = RepresentationModel(TINY["rdm"], ["T1", "T2"], spatial_dims=nd)
        x, y = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
        content, style = rdm.encode(x, "T1")
        assert content.shape == (2, 16) + tuple(n // 4 for n in shape)  # 4 channels x 2**2, 1/4 resolution
        assert style.shape == (2, 4)
        with torch.no_grad():
            out = rdm.translate(x, "T1", y)
        assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    with pytest.raises(ValueError, match="this model has T1, T2"):
        rdm.encode(x, "CT")


def test_adaptive_instance_norm_sets_each_channels_mean_and_spread():
    x = torch.randn(2, 3, 8, 8, 8) * 5 + 2
    scale, shift = torch.tensor([[0.0, 1.0, -0.5]] * 2), torch.tensor([[0.0, 3.0, -1.0]] * 2)
    y = adaptive_instance_norm(x, scale, shift)
    means, stds = y.mean(dim=(2, 3, 4)), y.std(dim=(2, 3, 4), unbiased=False)
    assert torch.allclose(means[0], torch.tensor([0.0, 3.0, -1.0]), atol=1e-4)
    assert torch.allclose(stds[0], torch.tensor([1.0, 2.0, 0.5]), atol=1e-3)


def test_generator_and_discriminator_losses_reach_only_their_own_parameters():
    torch.manual_seed(0)
    rdm = RepresentationModel(TINY["rdm"])
    discs = torch.nn.ModuleList(Discriminator(3, dict(DEFAULT_RDM_ARCHITECTURE, **TINY["rdm"])) for _ in range(2))
    x_a, x_b = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    g, d, parts = rdm_losses(rdm, discs, x_a, x_b, WEIGHTS, aligned=True)
    assert set(parts) == {"reconstruction", "latent", "cycle", "adversarial", "discriminator", "paired"}
    g.backward()  # the generator's adversarial term must not train the discriminators
    assert all(p.grad is None for p in discs.parameters())
    assert all(p.grad is not None for p in rdm.generator.parameters())
    rdm.zero_grad(set_to_none=True)
    d.backward()  # the discriminators' loss reads detached translations
    assert all(p.grad is None for p in rdm.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in discs.parameters())
    # unpaired images: no paired term
    assert "paired" not in rdm_losses(rdm, discs, x_a, x_b, WEIGHTS)[2]


def test_random_crop_takes_cubes_inside_the_image():
    img = torch.arange(20 * 30 * 10, dtype=torch.float32).reshape(1, 1, 20, 30, 10)
    crop = random_crop(img, 8, np.random.default_rng(0))
    assert crop.shape == (1, 1, 8, 8, 8)
    assert random_crop(img, 12, np.random.default_rng(1)).shape == (1, 1, 12, 12, 10)  # short axes stay whole
    assert random_crop(img, 0, np.random.default_rng(0)) is img


def test_rdm_stage_from_a_manifest_lowers_the_reconstruction_loss_and_writes_a_stage1_model(model_root, tmp_path, monkeypatch):
    """The RDM stage from a manifest (unpaired: fixed images = domain a, moving = domain b); the translation of an
    unseen phantom into the other contrast is measured against its real counterpart."""
    monkeypatch.setenv("MMREG_CACHE", str(tmp_path / "cache"))
    rows = []
    for k in range(4):
        sitk.WriteImage(_image(_phantom(seed=k)), str(tmp_path / f"a{k}.nii.gz"))
        sitk.WriteImage(_image(_phantom(shift=(0, 1, k - 1.5), seed=k + 10, contrast=T2_LIKE)), str(tmp_path / f"b{k}.nii.gz"))
        rows.append({"fixed": str(tmp_path / f"a{k}.nii.gz"), "moving": str(tmp_path / f"b{k}.nii.gz"),
                     "split": "validation" if k == 3 else ""})
    write_manifest(tmp_path / "pairs.csv", rows)
    cfg = config_from_dict({
        "method": "disentangled", "name": "rdm", "output": str(tmp_path / "rdm"), "spacing_mm": 2.0, "steps": 150,
        "learning_rate": 3e-3, "threads": 1, "validation_every": 75, "checkpoint_every": 0, "final_model": "last",
        "architecture": TINY, "disentangled": {"stage": "rdm", "crop_voxels": 16},
        "data": {"manifest": str(tmp_path / "pairs.csv"), "prealign": "none"},
        "augment": {"bias_strength": 0.0, "noise_std": 0.0, "augment_fixed": False}})
    result = train(cfg)
    rec = result.history["reconstruction"]
    assert np.mean(rec[-20:]) < 0.6 * np.mean(rec[:5]), (rec[:5], rec[-20:])
    card = json.loads((tmp_path / "rdm" / "model.json").read_text())
    assert card["training"]["stage"] == "rdm" and card["method"] == "disentangled"
    state, _ = load_rdm_state(str(tmp_path / "rdm"))
    assert set(state) == {k[4:] for k in DisentangledNet(TINY).state_dict() if k.startswith("rdm.")}
    # a stage-1 model cannot register: the message says what to do
    with pytest.raises(InputError, match="only the representation model"):
        mmreg.register(_image(_phantom()), _image(_phantom(contrast=T2_LIKE)), method="disentangled",
                       model=str(tmp_path / "rdm"), affine=False)


def test_translation_quality_scores_a_perfect_translator_above_the_untranslated_baseline():
    class Inverter(RepresentationModel):  # a hand-made RDM that knows the answer: b = 1 - a
        def translate(self, image, source, target_style_image):
            return 1.0 - image
    rdm = Inverter(TINY["rdm"])
    a = _t(_phantom(seed=3))
    q = translation_quality(rdm, a, 1.0 - a)
    assert q["a_to_b_ncc"] == pytest.approx(1.0, abs=1e-6) and q["identity_a_to_b_ncc"] == pytest.approx(-1.0, abs=1e-6)
    assert q["a_to_b_ssim"] > 0.99 > q["identity_a_to_b_ssim"]


# ----------------------------------------------------------------------------- registration stage


def test_registration_objective_is_lowest_at_the_true_displacement_through_the_translation():
    """With an RDM whose translation is exact (b = 1 - a) the MSD term compares warped images across contrasts: the
    true shift scores lower than the identity and than the wrong direction, in both directions of the pair."""
    torch.manual_seed(0)

    class Exact(RepresentationModel):
        def __init__(self):
            super().__init__(TINY["rdm"])
            self.content = torch.nn.ModuleList([_Identity(), _Invert()])  # content = the T1-like picture
            self.generator = torch.nn.ModuleList([_Take(), _TakeInverted()])
            self.style = torch.nn.ModuleList([_Zero(), _Zero()])

    fixed = _t(_phantom())
    moving = _t(1.0 - _phantom(shift=(0, 0, 2.0)))  # domain b, shifted by 2 voxels along x
    nd = 3
    true = torch.zeros(1, 2 * nd, 24, 24, 24)
    true[:, 2], true[:, 5] = 2.0, -2.0  # phi_1 reads moving at x + 2; phi_2 reads fixed at x - 2
    losses = {name: float(training_loss(fixed, moving, out, Exact(), smoothness=1.0)[0])
              for name, out in (("true", true), ("identity", torch.zeros_like(true)), ("wrong", -true))}
    assert losses["true"] < 0.5 * losses["identity"] < 0.5 * losses["wrong"], losses


class _Identity(torch.nn.Module):
    def forward(self, x):  # noqa: D102
        return x


class _Invert(torch.nn.Module):
    def forward(self, x):  # noqa: D102
        return 1.0 - x


class _Take(torch.nn.Module):
    def forward(self, content, style):  # noqa: D102
        return content


class _TakeInverted(torch.nn.Module):
    def forward(self, content, style):  # noqa: D102
        return 1.0 - content


class _Zero(torch.nn.Module):
    def forward(self, x):  # noqa: D102
        return torch.zeros(x.shape[0], 4)


def _save_constant_model(root, shift_voxels, name="disentangled_t1t2", stage=None):
    """A model whose registration network outputs a constant displacement (voxels, tensor channel order)."""
    torch.manual_seed(0)
    net = DisentangledNet(TINY)
    last = [m for m in net.registration.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(shift_voxels))
    card = ModelCard(name=name, method="disentangled", architecture=dict(TINY, kind="disentangled", spatial_dims=3,
                                                                         domains=["T1", "T2"]),
                     spacing_mm=2.0, multiple=16, diffeomorphic=False, integration_steps=7,
                     training={"stage": stage} if stage else {})
    return save_model(root / "user" / "disentangled" / name, net, card)


def test_registration_gives_the_physical_displacement_and_the_translated_moving_image(model_root):
    fixed = _image(_phantom((24, 30, 36)))
    moving = _image(1.0 - _phantom((24, 30, 36)))
    _save_constant_model(model_root, [0.0, 0.0, 1.5])
    r = mmreg.register(fixed, moving, method="disentangled", affine=False, threads=1)
    u = sitk.GetArrayFromImage(r.displacement)
    centre = u[8:16, 10:20, 12:24].reshape(-1, 3).mean(0)
    assert np.allclose(centre, [3.0, 0.0, 0.0], atol=0.05), centre  # 1.5 voxels of the 2 mm grid along x
    assert sorted(r.extra_images) == ["translated_moving"] == r.report["extra_images"]
    translated = r.extra_images["translated_moving"]
    assert translated.GetSize() == fixed.GetSize() and translated.GetSpacing() == fixed.GetSpacing()
    arr = sitk.GetArrayViewFromImage(translated)
    assert 0.0 <= float(arr.min()) and float(arr.max()) <= 1.0
    # either modality may be fixed: the same network; the translation goes the other way
    r2 = mmreg.register(moving, fixed, method="disentangled", affine=False, threads=1, moving_domain="T1")
    assert np.allclose(sitk.GetArrayFromImage(r2.displacement)[8:16, 10:20, 12:24].reshape(-1, 3).mean(0),
                       [3.0, 0.0, 0.0], atol=0.05)
    r3 = mmreg.register(fixed, moving, method="disentangled", affine=False, threads=1, translate=False)
    assert r3.extra_images == {}
    with pytest.raises(InputError, match=r"moving_domain must be one of the model's modalities \(T1, T2\)"):
        mmreg.register(fixed, moving, method="disentangled", affine=False, moving_domain="CT")


def test_disentangled_is_listed_as_multimodal_with_refinement_and_a_default_model():
    assert "disentangled" in mmreg.method_names()
    method = mmreg.get_method("disentangled")
    opts = method.default_options()
    assert opts["refine_similarity"] == "mind" and opts["moving_domain"] is None and opts["translate"] is True
    assert method.default_model == "disentangled_t1t2" and method.modalities == "multi"


def test_registration_stage_trains_only_the_registration_network(model_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MMREG_CACHE", str(tmp_path / "cache"))
    rdm_folder = _save_constant_model(model_root, [0.0, 0.0, 0.0], name="rdm_only", stage="rdm")
    rows = []
    for k in range(3):
        sitk.WriteImage(_image(_phantom((16, 16, 16), seed=k)), str(tmp_path / f"a{k}.nii.gz"))
        sitk.WriteImage(_image(_phantom((16, 16, 16), shift=(0, 0, 1), seed=k, contrast=T2_LIKE)), str(tmp_path / f"b{k}.nii.gz"))
        rows.append({"fixed": str(tmp_path / f"a{k}.nii.gz"), "moving": str(tmp_path / f"b{k}.nii.gz"),
                     "split": "validation" if k == 2 else ""})
    write_manifest(tmp_path / "pairs.csv", rows)
    cfg = config_from_dict({
        "method": "disentangled", "name": "reg", "output": str(tmp_path / "reg"), "spacing_mm": 2.0, "steps": 3,
        "learning_rate": 1e-3, "threads": 1, "validation_every": 0, "architecture": TINY,
        "disentangled": {"stage": "registration", "rdm_model": "rdm_only"},
        "data": {"manifest": str(tmp_path / "pairs.csv"), "prealign": "none"}})
    before = torch.load(rdm_folder / "model.pt", weights_only=True)
    train(cfg)
    after = torch.load(tmp_path / "reg" / "model.pt", weights_only=True)
    rdm_keys = [k for k in before if k.startswith("rdm.")]
    assert rdm_keys and all(torch.equal(before[k], after[k]) for k in rdm_keys)  # frozen
    reg_keys = [k for k in before if k.startswith("registration.")]
    assert any(not torch.equal(before[k], after[k]) for k in reg_keys)  # trained
    card = json.loads((tmp_path / "reg" / "model.json").read_text())
    assert "stage" not in card["training"] and card["training"]["config"]["disentangled"]["rdm_model"] == "rdm_only"


def test_bad_disentangled_configs_name_the_key():
    with pytest.raises(InputError, match="disentangled.stage must be"):
        config_from_dict({"method": "disentangled", "disentangled": {"stage": "both", "rdm_model": "x"}})
    with pytest.raises(InputError, match="registration stage needs the trained RDM"):
        config_from_dict({"method": "disentangled", "data": {"sources": {"t1_template": 1.0}, "template_modalities": ["T2"]}})
    with pytest.raises(InputError, match="may only weigh t1_template"):
        config_from_dict({"method": "disentangled", "disentangled": {"stage": "rdm"},
                          "data": {"sources": {"t1_t1": 1.0}, "template_modalities": ["T2"]}})
    with pytest.raises(InputError, match="exactly one"):
        config_from_dict({"method": "disentangled", "disentangled": {"stage": "rdm"},
                          "data": {"sources": {"t1_template": 1.0}, "template_modalities": ["T2", "PD"]}})
    with pytest.raises(InputError, match="architecture.domains must name two different"):
        config_from_dict({"method": "disentangled", "architecture": {"domains": ["T1", "T1"]},
                          "disentangled": {"stage": "rdm"}, "data": {"sources": {"t1_template": 1.0},
                                                                       "template_modalities": ["T2"]}})
    with pytest.raises(InputError, match="disentangled.paired_fraction must be in"):
        config_from_dict({"method": "disentangled", "disentangled": {"stage": "rdm", "paired_fraction": 2.0},
                          "data": {"sources": {"t1_template": 1.0}, "template_modalities": ["T2"]}})
    with pytest.raises(InputError, match=r"Unknown key\(s\) disentangled.gan_weight"):
        config_from_dict({"method": "disentangled", "disentangled": {"gan_weight": 1.0}})


def test_a_single_slice_runs_through_the_3d_model_as_a_slab(model_root):
    """2-D inputs (single-slice volumes) with the shipped kind of model (3-D): the slice is repeated across a slab,
    the field is read at its middle slice, and its in-plane components are kept."""
    arr = _phantom((5, 40, 48))[2]
    fixed = sitk.GetImageFromArray(arr * 1000.0)
    fixed.SetSpacing([2.0, 2.0])
    moving = sitk.GetImageFromArray((1.0 - arr) * 1000.0)
    moving.SetSpacing([2.0, 2.0])
    _save_constant_model(model_root, [0.7, 1.0, 1.5])  # across the slab, along y, along x (voxels)
    r = mmreg.register(fixed, moving, method="disentangled", affine=False, threads=1)
    u = sitk.GetArrayFromImage(r.displacement)
    assert u.shape == (1, 40, 48, 3)  # a single-slice volume (the engine's form of a 2-D image)
    assert np.allclose(u[0, 10:30, 10:38].reshape(-1, 3).mean(0), [3.0, 2.0, 0.0], atol=0.05)  # (x, y, z) in mm
    translated = r.extra_images["translated_moving"]
    assert translated.GetSize()[:2] == fixed.GetSize()
