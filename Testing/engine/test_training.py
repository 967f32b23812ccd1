"""`mmreg train`: config validation, a tiny synthetic run, checkpoint/resume, the saved model in use."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import mmreg
from mmreg.errors import CancelledError, InputError, WeightsError
from mmreg.grid import NetworkGrid
from mmreg.models import load_model
from mmreg.networks import DEFAULT_ARCHITECTURE, registration_unet
from mmreg.spatial import integrate_velocity
from mmreg.training import (Subject, TrainingData, config_from_dict, load_config, load_checkpoint, prepare_ixi,
                            random_smooth_field, read_progress, train)

N = 32
TINY_ARCH = {"channels": [8, 8, 8, 8], "final_conv_channels": [8]}
NO_AUGMENT = {"deformation_max_mm": 0, "rotation_deg": 0, "scale": 0, "translation_mm": 0, "bias_strength": 0,
              "noise_std": 0}


def blob(sid: str, shift_x: float = 0.0, contrast=(0, 0.5, 0.8, 0.3, 0.6)) -> Subject:
    """A 32^3 'head': nested spheres (4 labels) centred at x = 16 + shift_x (voxels); ``contrast``:
    the intensity of the background and each label (smoothed, scaled to a maximum of 1)."""
    z, y, x = np.mgrid[:N, :N, :N].astype(np.float32)
    c = N / 2
    r = np.sqrt((z - c) ** 2 + (y - c) ** 2 + (x - shift_x - c) ** 2)
    lab = np.zeros((N, N, N), np.int16)
    lab[r < 11] = 1
    lab[r < 7] = 2
    lab[r < 4] = 3
    lab[(r < 11) & (r >= 7) & (x - shift_x > c + 3)] = 4
    from scipy.ndimage import gaussian_filter
    img = gaussian_filter(np.array(contrast, np.float32)[lab], 1.5)  # smooth: MI has a gradient
    return Subject(sid, (img / img.max()).astype(np.float32), lab)


def grid() -> NetworkGrid:
    ref = sitk.Image([N, N, N], sitk.sitkFloat32)
    ref.SetSpacing([2.0, 2.0, 2.0])
    return NetworkGrid.for_image(ref, 2.0, 4, margin_voxels=0)


def tiny(tmp_path, **kw) -> dict:
    cfg = {"name": "tiny", "output": str(tmp_path / "model"), "steps": 10, "learning_rate": 2e-3, "threads": 1,
           "device": "cpu", "validation_every": 5, "checkpoint_every": 5, "architecture": TINY_ARCH}
    cfg.update(kw)
    return cfg


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("table, words", [
    ({"stepz": 3}, "Unknown key(s) stepz"),
    ({"augment": {"noise": 0.1}}, "augment.noise"),
    ({"data": {"sources": {"t1_ct": 1.0}}}, "t1_ct"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"steps": "many"}, "steps must be an integer"),
    ({"learning_rate": -1}, "learning_rate must be > 0"),
    ({"diffeomorphic": 1}, "true or false"),
    ({"method": "optimize"}, "cannot be trained"),
    ({"grid_size": [30, 32, 32]}, "multiples of 16"),
    ({"data": {"sources": {"t1_t1": 0, "t1_template": 0, "t1_synth": 0}}}, "positive sum"),
    ({"data": {"validation_subjects": ["IXI012"], "training_subjects": ["IXI012", "IXI013"]}}, "held-out"),
    ({"augment": {"scale": -0.1}}, "augment.scale must be >= 0"),
    ({"architecture": {"channels": [8, 8, 8]}}, "even-length"),
    ({"architecture": {"input_features": "sobel"}}, "input_features must be one of intensity, mind, intensity_and_mind"),
    ({"architecture": {"input_features": "mind", "mind_dilation": 0}}, "mind_dilation must be an integer >= 1"),
    ({"final_model": "first"}, "final_model"),
    ({"mi_blur_voxels": -1.0}, "mi_blur_voxels must be >= 0"),
    ({"data": 3}, "[data] must be a table"),
    ({"warmup_steps": -5}, "warmup_steps must be an integer >= 0"),
    ({"gradient_clip": -1.0}, "gradient_clip must be >= 0"),
    ({"method": "metric", "warmup_steps": 10}, "their own trainers"),
    ({"teacher_model": "mi_brain_3mm", "teacher_optimisation": {"similarity": "mind"}}, "give one of them"),
    ({"teacher_optimisation": {"similarity": "mind", "steps": 5}}, "teacher_optimisation has unknown key(s) steps"),
    ({"teacher_optimisation": {"levels": 2}, "augment": {"deformation_max_mm": 4.0}}, "augment.deformation_max_mm to 0"),
    ({"teacher_optimisation": {"levels": 2}, "augment": NO_AUGMENT, "data": {"sources": {"t1_t1": 1.0, "t1_synth": 1.0}}},
     "data.sources.t1_synth to 0"),
    ({"teacher_optimisation": "mind"}, "teacher_optimisation must be a table"),
    ({"teacher_optimisation": {"similarity": "ncc"}}, "teacher_optimisation.similarity must be one of mind"),
    ({"method": "metric", "teacher_model": "mi_brain"}, "their own trainers"),
    ({"teacher_models": {"t1_templates": "mi_brain"}}, "teacher_models has unknown source(s) t1_templates"),
    ({"teacher_models": {"t1_template": 3}}, "teacher_models.t1_template must be a model name"),
    ({"teacher_models": {"t1_self": "mi_brain"}}, "names source(s) t1_self that this run does not draw"),
    ({"teacher_models": {"t1_t1": "mi_brain"}, "teacher_optimisation": {"levels": 2}}, "give one of them"),
    ({"teacher_models": "mi_brain"}, "teacher_models must be a table"),
    ({"teacher_weight": -1.0}, "teacher_weight must be > 0"),
    ({"augment": {"moving_blur_voxels": -1.0}}, "augment.moving_blur_voxels must be >= 0"),
    ({"data": {"manifest": "pairs.csv", "validate_templates": True}}, "remove validate_templates"),
    ({"data": {"validate_templates": "yes"}}, "validate_templates"),
])
def test_config_errors_name_the_key(table, words):
    with pytest.raises(InputError) as err:
        config_from_dict(table)
    assert words in str(err.value)


def test_every_recipe_in_resources_loads():
    # a recipe that no longer validates (a renamed key, a bad value) would fail only when a user reruns it
    from conftest import REPO
    recipes = sorted((REPO / "Resources" / "Training").glob("*.toml"))
    assert len(recipes) >= 10
    methods = {p.stem: load_config(p).method for p in recipes}
    assert methods["mi_brain"] == methods["mi_brain_mind"] == "mi"
    mind = load_config(REPO / "Resources" / "Training" / "mi_brain_mind.toml").full_architecture()
    assert mind["input_features"] == "mind" and mind["channels"] == DEFAULT_ARCHITECTURE["channels"]


def test_shipped_config_is_valid_and_toml_errors_are_input_errors(tmp_path):
    from conftest import REPO
    cfg = load_config(REPO / "Resources" / "Training" / "mi_brain.toml")
    assert cfg.method == "mi" and cfg.spacing_mm == 4.0 and cfg.data.validation_subjects
    assert cfg.data.sources["t1_synth"] == 0.0  # measured to hurt with MI (see the config)
    # two stages: mi_brain fine-tunes mi_brain_stage1; the shipped model's card records this recipe
    stage1 = load_config(REPO / "Resources" / "Training" / "mi_brain_stage1.toml")
    assert cfg.base_model == stage1.name == "mi_brain_stage1" and stage1.base_model is None
    card = json.loads((REPO / "Resources" / "Models" / "mi" / "mi_brain" / "model.json").read_text())
    recorded = card["training"]["config"]
    for key in ("learning_rate", "spacing_mm", "smoothness", "mi_blur_voxels", "base_model", "seed"):
        assert recorded[key] == getattr(cfg, key), key
    assert recorded["data"]["sources"] == cfg.data.sources
    # the card's recorded [augment] read as a config: keys added since the card was written take their defaults
    assert config_from_dict({"augment": recorded["augment"]}).augment == cfg.augment
    assert card["training"]["stages"][0]["learning_rate"] == stage1.learning_rate
    # mi_brain_3mm: mi_brain trained on at 3 mm; its card records the run its recipe repeats (500 steps)
    fine = load_config(REPO / "Resources" / "Training" / "mi_brain_3mm.toml")
    card = json.loads((REPO / "Resources" / "Models" / "mi" / "mi_brain_3mm" / "model.json").read_text())
    recorded = card["training"]["config"]
    assert fine.base_model == "mi_brain" and fine.spacing_mm == recorded["spacing_mm"] == card["spacing_mm"] == 3.0
    for key in ("learning_rate", "smoothness", "mi_blur_voxels", "base_model", "seed", "batch_size"):
        assert recorded[key] == getattr(fine, key), key
    assert recorded["data"]["sources"] == fine.data.sources
    # the card's recorded [augment] read as a config: keys added since the card was written take their defaults
    assert config_from_dict({"augment": recorded["augment"]}).augment == fine.augment
    assert card["training"]["validation"]["best"]["step"] == fine.steps == 500
    assert card["inference_spacing_mm"] == 2.0
    # mi_brain_mind_distilled: mi_brain_mind taught by mi_brain_3mm at 3 mm; its card records the run (750 steps, the
    # weights of its best validation at step 500, the recipe's steps)
    taught = load_config(REPO / "Resources" / "Training" / "mi_brain_mind_distilled.toml")
    card = json.loads((REPO / "Resources" / "Models" / "mi" / "mi_brain_mind_distilled" / "model.json").read_text())
    recorded = card["training"]["config"]
    assert taught.base_model == "mi_brain_mind" and taught.teacher_model == "mi_brain_3mm"
    assert taught.full_architecture()["input_features"] == card["architecture"]["input_features"] == "mind"
    for key in ("learning_rate", "smoothness", "mi_blur_voxels", "base_model", "teacher_model", "teacher_weight",
                "seed", "batch_size", "spacing_mm"):
        assert recorded[key] == getattr(taught, key), key
    assert recorded["data"]["sources"] == taught.data.sources
    # the card's recorded [augment] read as a config: keys added since the card was written take their defaults
    assert config_from_dict({"augment": recorded["augment"]}).augment == taught.augment
    assert card["training"]["validation"]["best"]["step"] == taught.steps == 500
    assert card["inference_spacing_mm"] == 2.0 and card["spacing_mm"] == 3.0
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = [\n")
    with pytest.raises(InputError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    ok = tmp_path / "ok.toml"
    ok.write_text('output = "models/x"\nsteps = 5\n')
    cfg = load_config(ok, steps=7)
    assert cfg.steps == 7 and cfg.output == str(tmp_path.resolve() / "models" / "x")


def test_random_smooth_field_is_reproducible_and_bounded():
    a = random_smooth_field((16, 16, 16), 3.0, 8.0, np.random.default_rng(4))
    b = random_smooth_field((16, 16, 16), 3.0, 8.0, np.random.default_rng(4))
    assert torch.equal(a, b) and a.shape == (1, 3, 16, 16, 16)
    assert 0.2 < float(a.norm(dim=1).max()) < 4.0


def test_synthesised_pairs_compare_brain_with_brain():
    """A contrast synthesised from labels covers the labelled region only: the fixed T1 is masked to its own
    labelled region (dilated one voxel) in training and validation pairs; validation can leave them out."""
    from mmreg.training import PairSampler, brain_mask, validation_pairs
    data = TrainingData(grid(), [blob("a"), blob("b", 2.0)], [blob("c"), blob("d", -2.0)], {})
    mask = brain_mask(data.validation[0].labels)
    assert mask.sum() > (data.validation[0].labels > 0).sum()  # dilated
    pairs = validation_pairs(data)
    assert [p["name"] for p in pairs] == ["c<-d T1", "c<-d synth", "d<-c T1", "d<-c synth"]
    synth = pairs[1]
    assert float(synth["fixed"][0, 0][torch.from_numpy(mask) == 0].abs().max()) == 0.0
    assert torch.equal(synth["fixed"][0, 0][torch.from_numpy(mask) > 0], pairs[0]["fixed"][0, 0][torch.from_numpy(mask) > 0])
    assert [p["name"] for p in validation_pairs(data, synth=False)] == ["c<-d T1", "d<-c T1"]
    cfg = config_from_dict(tiny(Path("unused"), data={"sources": {"t1_synth": 1.0}}, augment=NO_AUGMENT))
    fixed, moving, source = PairSampler(data, cfg, {"t1_synth": 1.0}, "cpu").raw_pair(np.random.default_rng(0))
    assert source == "t1_synth" and moving.shape == fixed.shape
    outside = [brain_mask(s.labels) == 0 for s in data.training]
    assert any(float(fixed[0, 0][torch.from_numpy(o)].abs().max()) == 0.0 for o in outside)


def test_self_pairs_are_the_same_anatomy_in_another_contrast():
    """t1_self: moving = the fixed subject itself, as it is or through a random intensity curve that keeps
    the background dark and the anatomy (equal intensities stay equal), so only the augmentation misaligns."""
    from mmreg.training import PairSampler, remap_intensities, validation_pairs
    img = torch.from_numpy(blob("a").image)[None, None]
    curves = [remap_intensities(img, np.random.default_rng(k)) for k in range(20)]
    for out in curves:
        assert out.shape == img.shape and float(out.min()) == 0.0 and abs(float(out.max()) - 1.0) < 1e-6
        assert float(out[img == 0].abs().max()) == 0.0  # background -> 0
        a, b = img.flatten(), out.flatten()  # a function of the intensity: equal in, equal out
        same = a == a[a > 0][0]
        assert float(b[same].max() - b[same].min()) < 1e-6
    tissue = img > 0.2
    corr = [float(torch.corrcoef(torch.stack([img[tissue], c[tissue]]))[0, 1]) for c in curves]
    assert min(corr) < 0 < max(corr)  # some curves invert the contrast (T2-like), some keep it
    data = TrainingData(grid(), [blob("a"), blob("b", 2.0)], [blob("c")], {})
    cfg = config_from_dict(tiny(Path("unused"), data={"sources": {"t1_self": 1.0}}, augment=NO_AUGMENT))
    sampler = PairSampler(data, cfg, {"t1_self": 1.0}, "cpu")
    rng = np.random.default_rng(1)
    kinds = set()
    for _ in range(12):
        fixed, moving, source = sampler.raw_pair(rng)
        assert source == "t1_self"
        kinds.add(torch.equal(fixed, moving))
        assert torch.equal(fixed == 0, moving == 0)  # same anatomy, same background
    assert kinds == {True, False}  # mono and remapped pairs both occur
    # t1_t1_remap: another subject's T1 in a random contrast; validated on remapped pairs as well
    fixed, moving, source = PairSampler(data, cfg, {"t1_t1_remap": 1.0}, "cpu").raw_pair(np.random.default_rng(2))
    assert source == "t1_t1_remap" and not torch.equal(fixed == 0, moving == 0)  # not the same subject
    pairs = validation_pairs(TrainingData(grid(), data.training, [blob("c"), blob("d", -2.0)], {}), synth=False,
                             remap=True)
    assert [p["name"] for p in pairs] == ["c<-d T1", "c<-d remapped", "d<-c T1", "d<-c remapped"]
    assert float((pairs[1]["moving"] - pairs[0]["moving"]).abs().max()) > 0.1


def test_teacher_reads_the_pair_before_the_intensity_curve_through_the_same_augmentation():
    """batch(teacher=True): a fourth tensor, the moving image before t1_t1_remap's intensity curve, through the
    same augmentation draws (same deformation); the pairs themselves do not change."""
    from mmreg.training import PairSampler, pair_rng
    data = TrainingData(grid(), [blob("a"), blob("b", 2.0)], [blob("c")], {})
    plain = config_from_dict(tiny(Path("unused"), data={"sources": {"t1_t1_remap": 1.0}}, augment=NO_AUGMENT))
    sampler = PairSampler(data, plain, {"t1_t1_remap": 1.0}, "cpu")
    fixed, moving, sources, before = sampler.batch(0, [0], teacher=True)
    assert sources == ["t1_t1_remap"] and before.shape == moving.shape
    subjects = [torch.from_numpy(s.image)[None, None] for s in data.training]
    assert any(torch.equal(before, s) for s in subjects) and not torch.equal(before, moving)
    warped = config_from_dict(tiny(Path("unused"), data={"sources": {"t1_t1_remap": 1.0}},
                                   augment=dict(NO_AUGMENT, deformation_max_mm=12.0, deformation_control_mm=16.0)))
    sampler = PairSampler(data, warped, {"t1_t1_remap": 1.0}, "cpu")
    for step in range(3):
        f1, m1, _ = sampler.batch(step, [0])
        f2, m2, _, t2 = sampler.batch(step, [0], teacher=True)
        assert torch.equal(f1, f2) and torch.equal(m1, m2)
        unwarped = sampler.raw_pair(pair_rng(warped.seed, step, 0), original=True)[3]

        def explained(a, b):  # correlation ratio: how far b is a function of a (1: entirely)
            a, b = a.flatten().numpy(), b.flatten().numpy()
            bins = np.digitize(a, np.linspace(a.min(), a.max(), 41))
            within = sum(((b[bins == k] - b[bins == k].mean()) ** 2).sum() for k in np.unique(bins))
            return 1.0 - within / ((b - b.mean()) ** 2).sum()
        # the moving image is the teacher's copy through the intensity curve: (nearly) a function of it, more than
        # of the same image without the deformation
        assert explained(t2, m2) > 0.98 and explained(t2, m2) > explained(unwarped, m2) + 0.02


def test_teacher_reads_the_sharp_t1_of_blurred_moving_images_and_the_t1_template_of_template_pairs():
    """augment.moving_blur_voxels blurs the network's moving T1 of t1_t1 pairs while a teacher reads it sharp; in a
    t1_template pair the teacher reads the T1 template (data.template_t1) in place of the T2 template."""
    from mmreg.training import PairSampler
    subjects = [blob("a"), blob("b", 2.0)]
    t2 = blob("t", 3.0, contrast=(0, 0.9, 0.2, 0.6, 0.4)).image
    t1 = blob("t", 3.0).image
    data = TrainingData(grid(), subjects, [blob("c")], {"T2": t2}, template_t1=t1)
    cfg = config_from_dict(tiny(Path("unused"), data={"sources": {"t1_t1": 1.0}},
                                augment=dict(NO_AUGMENT, moving_blur_voxels=3.0)))
    sampler = PairSampler(data, cfg, {"t1_t1": 1.0}, "cpu")

    def roughness(x):  # mean absolute difference of neighbouring voxels
        return float(sum(torch.diff(x, dim=d).abs().mean() for d in (2, 3, 4)))
    images = [torch.from_numpy(s.image)[None, None] for s in subjects]
    ratios = []
    for step in range(6):
        _, moving, _, teacher_moving = sampler.batch(step, [0], teacher=True)
        sharp = [im for im in images if torch.allclose(im, teacher_moving)]
        assert len(sharp) == 1  # the teacher reads a subject's T1 as it is
        ratios.append(roughness(moving) / roughness(sharp[0]))
    # sigma ~ U(0, 3) voxels on already smooth images: never sharper, most draws visibly smoother
    assert max(ratios) <= 1.0 + 1e-6 and sum(r < 0.97 for r in ratios) >= 4
    pairs = config_from_dict(tiny(Path("unused"), data={"sources": {"t1_template": 1.0}}, augment=NO_AUGMENT))
    _, moving, sources, teacher_moving = PairSampler(data, pairs, {"t1_template": 1.0}, "cpu").batch(0, [0], teacher=True)
    assert sources == ["t1_template"]
    assert torch.allclose(moving[0, 0], torch.from_numpy(t2)) and torch.allclose(teacher_moving[0, 0], torch.from_numpy(t1))
    data.template_t1 = None  # no T1 view of the templates: the teacher reads the pair as it is
    _, moving, _, teacher_moving = PairSampler(data, pairs, {"t1_template": 1.0}, "cpu").batch(0, [0], teacher=True)
    assert torch.equal(moving, teacher_moving)


def test_template_validation_pairs_score_held_out_subjects_against_each_template(tmp_path):
    """data.validate_templates: each held-out subject's T1 <- each MR template (the labels are not the CT
    template's), scored with the templates' labels (kind "template" in the run's validation numbers)."""
    tmpl = blob("t", 3.0)
    data = TrainingData(grid(), [blob("a")], [blob("c"), blob("d", 3.0)],
                        {"T2": tmpl.image, "PD": tmpl.image, "CT": tmpl.image}, template_labels=tmpl.labels)
    from mmreg.training import validation_pairs
    assert [p["name"] for p in validation_pairs(data, synth=False, templates=True)] == [
        "c<-d T1", "d<-c T1", "c<-avg152PD template", "c<-avg152T2 template", "d<-avg152PD template",
        "d<-avg152T2 template"]
    assert [p["name"] for p in validation_pairs(data, synth=False)] == ["c<-d T1", "d<-c T1"]
    run = train(config_from_dict(tiny(tmp_path, steps=1, validation_every=1, checkpoint_every=0, augment=NO_AUGMENT,
                                      data={"sources": {"t1_template": 1.0}, "validate_templates": True})), data)
    kinds = next(e for e in read_progress(run.model_dir)[0] if e.get("event") == "validation")["dice_by_kind"]
    assert set(kinds) == {"T1", "template"}
    # at step 0: d lies where the templates lie (Dice near 1 against them), c 3 voxels away (as from d)
    assert kinds["template"] > kinds["T1"] + 0.1


def test_teacher_model_pulls_the_network_towards_its_fields(tmp_path):
    """Distillation: with teacher_model (a trained model of the method) the network's output moves towards the
    teacher's on the training pairs, much closer than the same run without a teacher; a teacher that predicts
    another kind of field is an InputError naming teacher_model."""
    data = TrainingData(grid(), [blob("a")], [blob("c"), blob("d", 3.0)], {"T2": blob("t", 3.0).image})
    shift = dict(data={"sources": {"t1_template": 1.0}}, augment=NO_AUGMENT, smoothness=0.1, final_model="last",
                 validation_every=0, checkpoint_every=0)
    teacher = train(config_from_dict(tiny(tmp_path / "teacher", steps=30, learning_rate=4e-3, **shift)), data)
    teacher_net, _ = load_model("mi", teacher.model_dir, registration_unet)
    pair = torch.cat([torch.from_numpy(data.training[0].image)[None, None],
                      torch.from_numpy(data.templates["T2"])[None, None]], 1)

    def distance(model_dir):
        net, _ = load_model("mi", model_dir, registration_unet)
        with torch.no_grad():
            return float(torch.mean((net(pair) - teacher_net(pair)) ** 2))
    # students: the same fresh start, seed and pairs, with a low learning rate so MI alone moves them little
    student = dict(shift, steps=12, learning_rate=1e-3, seed=5)
    alone = train(config_from_dict(tiny(tmp_path / "alone", **student)), data)
    taught = train(config_from_dict(tiny(tmp_path / "taught", teacher_model=str(teacher.model_dir),
                                         teacher_weight=20.0, **student)), data)
    assert distance(taught.model_dir) < 0.5 * distance(alone.model_dir), (distance(taught.model_dir),
                                                                          distance(alone.model_dir))
    assert taught.card.training["config"]["teacher_model"] == str(teacher.model_dir)
    assert len(taught.history["teacher"]) == 12 and taught.history["teacher"][-1] < taught.history["teacher"][0]
    with pytest.raises(InputError, match="teacher_model"):
        train(config_from_dict(tiny(tmp_path / "bad", teacher_model=str(teacher.model_dir), diffeomorphic=False,
                                    **student)), data)
    with pytest.raises(InputError, match="teacher_weight must be > 0"):
        config_from_dict(tiny(tmp_path / "w", teacher_model="x", teacher_weight=0.0))


def test_teacher_models_teach_each_source_with_its_own_teacher(tmp_path):
    """teacher_models: a pair of a listed source is taught by its own teacher (the teacher term is > 0 on exactly
    those steps when no teacher_model covers the rest); a model named for two sources is loaded once, the
    default teacher covers the other sources, and an unknown model is an InputError naming the source's key."""
    from mmreg.training import load_teachers
    data = TrainingData(grid(), [blob("a"), blob("b", 2.0)], [blob("c"), blob("d", 3.0)],
                        {"T2": blob("t", 3.0).image})
    mixed = dict(data={"sources": {"t1_t1": 1.0, "t1_template": 1.0}}, augment=NO_AUGMENT, final_model="last",
                 validation_every=0, checkpoint_every=0)
    teacher = train(config_from_dict(tiny(tmp_path / "teacher", steps=2, **mixed)), data)
    run = train(config_from_dict(tiny(tmp_path / "taught", steps=12, teacher_weight=20.0,
                                      teacher_models={"t1_template": str(teacher.model_dir)}, **mixed)), data)
    sources, taught = run.history["source"], run.history["teacher"]
    assert {"t1_t1", "t1_template"} <= set(sources) and len(taught) == len(sources) == 12
    assert all((t > 0) == (s == "t1_template") for s, t in zip(sources, taught)), list(zip(sources, taught))
    assert run.card.training["config"]["teacher_models"] == {"t1_template": str(teacher.model_dir)}

    other = train(config_from_dict(tiny(tmp_path / "other", steps=2, seed=3, **mixed)), data)
    cfg = config_from_dict(tiny(tmp_path / "x", teacher_model=str(other.model_dir), teacher_models={
        "t1_template": str(teacher.model_dir), "t1_t1": str(teacher.model_dir)}, **mixed))
    teachers = load_teachers(cfg, torch.device("cpu"))
    assert set(teachers) == {None, "t1_t1", "t1_template"} and teachers["t1_t1"] is teachers["t1_template"]
    assert teachers[None] is not teachers["t1_t1"]
    cfg.teacher_models = {"t1_template": str(tmp_path / "no_such_model")}
    with pytest.raises(WeightsError, match="teacher_models.t1_template"):
        load_teachers(cfg, torch.device("cpu"))


def test_optimisation_teacher_finds_the_shift_once_and_pulls_the_network_to_it(tmp_path):
    """teacher_optimisation: the engine's instance optimisation is the teacher. Its field of a pair shifted 3 voxels
    along x is ~ +3 voxels along x; it is computed once per pair (kept in memory and in the cache folder, where a new
    teacher finds it); a network trained with it ends much closer to that field than the same run without it."""
    from mmreg.training import OptimisationTeacher, PairSampler
    data = TrainingData(grid(), [blob("a")], [blob("c"), blob("d", 3.0)], {"T2": blob("t", 3.0).image})
    options = {"similarity": "mind", "levels": 2, "finest_factor": 1, "iterations": [30, 30]}
    lines = []
    teacher = OptimisationTeacher(options, data.grid, tmp_path / "fields", "cpu", lines.append)
    f = torch.from_numpy(data.training[0].image)[None, None]
    m = torch.from_numpy(data.templates["T2"])[None, None]
    u = teacher([(f, m)])
    inside = torch.from_numpy(data.training[0].labels > 0)
    assert 2.5 < float(u[0, 2][inside].mean()) < 3.5 and abs(float(u[0, 0][inside].mean())) < 0.3
    assert torch.equal(teacher([(f, m)]), u) and teacher.computed == 1 and len(lines) == 1
    mask = teacher.mask([(f, m)])[0, 0]  # compared inside the fixed image's foreground only
    assert float(mask[inside].min()) == 1.0 and float(mask[0, 0, 0]) == 0.0 and 0.1 < float(mask.mean()) < 0.6
    again = OptimisationTeacher(options, data.grid, tmp_path / "fields", "cpu")
    assert torch.equal(again([(f, m)]), u) and again.computed == 0  # read from the cache folder
    assert OptimisationTeacher(dict(options, levels=1), data.grid, tmp_path / "fields", "cpu")._pair_key(f, m) \
        != teacher._pair_key(f, m)  # other options, another field

    common = dict(data={"sources": {"t1_template": 1.0}, "cache_dir": str(tmp_path / "cache")}, augment=NO_AUGMENT,
                  smoothness=0.1, final_model="last", validation_every=0, checkpoint_every=0, steps=12,
                  learning_rate=3e-3, seed=5)
    alone = train(config_from_dict(tiny(tmp_path / "alone", **common)), data)
    taught = train(config_from_dict(tiny(tmp_path / "taught", teacher_optimisation=options, teacher_weight=20.0,
                                         **common)), data)
    sampler = PairSampler(data, config_from_dict(tiny(tmp_path / "s", **common)), {"t1_template": 1.0}, "cpu")
    pairs = [sampler.batch(0, [0], raw=True)[3][0]]  # (fixed, template) before augmentation
    target = OptimisationTeacher(options, data.grid, tmp_path / "cache" / "teacher_fields", "cpu")

    def distance(model_dir) -> float:
        """Mean squared displacement difference (voxels^2) inside the foreground, where the teacher is compared."""
        net, card = load_model("mi", model_dir, registration_unet)
        with torch.no_grad():
            squared = (integrate_velocity(net(torch.cat(pairs[0], 1)), card.integration_steps) - target(pairs)) ** 2
        return float(squared.sum(1, keepdim=True)[target.mask(pairs) > 0].mean())
    assert target.computed == 0  # the run filled the cache
    assert distance(taught.model_dir) < 0.5 * distance(alone.model_dir), (distance(taught.model_dir),
                                                                          distance(alone.model_dir))
    assert taught.card.training["config"]["teacher_optimisation"] == options
    assert len(taught.history["teacher"]) == 12 and taught.history["teacher"][-1] < taught.history["teacher"][0]


# ----------------------------------------------------------------------------- training


def test_tiny_training_learns_a_known_shift_and_the_model_registers(tmp_path):
    """Fixed = a blob, moving = the same blob 3 voxels further along x (as the 'template'), no
    augmentation: the network must learn u_x ~ +3 (fixed x <-> moving x + u(x))."""
    data = TrainingData(grid(), [blob("a")], [blob("c"), blob("d", 3.0)], {"T2": blob("t", 3.0).image})
    cfg = config_from_dict(tiny(tmp_path, steps=40, learning_rate=4e-3, smoothness=0.1, validation_every=20, final_model="last",
                                data={"sources": {"t1_template": 1.0}}, augment=NO_AUGMENT))
    lines = []
    result = train(cfg, data, log=lines.append)
    h = result.history
    assert result.final_step == 40 and len(h["loss"]) == 40
    assert np.mean(h["loss"][-5:]) < h["loss"][0] - 0.01, h["loss"]
    assert [v["step"] for v in h["validation"]] == [0, 20, 40]
    assert set(h["validation"][-1]["dice_by_kind"]) == {"T1"}  # per kind of validation pair
    assert h["validation"][-1]["dice_by_kind"]["T1"] == pytest.approx(h["validation"][-1]["mean_dice"])
    assert any("validation at step 0" in line for line in lines)

    network, card = load_model("mi", result.model_dir, registration_unet)
    assert card.multiple == 4 and card.spacing_mm == 2.0 and card.diffeomorphic
    assert card.training["steps"] == 40 and card.training["wall_time_s"] > 0
    assert card.training["validation"]["history"][-1]["step"] == 40
    f = torch.from_numpy(data.training[0].image)[None, None]
    m = torch.from_numpy(data.templates["T2"])[None, None]
    with torch.no_grad():
        u = integrate_velocity(network(torch.cat([f, m], 1)), card.integration_steps)
    inside = torch.from_numpy(data.training[0].labels > 0)
    ux = float(u[0, 2][inside].mean())
    assert 2.0 < ux < 4.0, ux  # the true shift is +3 voxels (~0 before training)
    assert abs(float(u[0, 0][inside].mean())) < 0.5 * ux

    # The model works through the normal registration API (its folder as --model).
    fixed = sitk.GetImageFromArray(data.training[0].image)
    fixed.SetSpacing([2.0, 2.0, 2.0])
    moving = sitk.GetImageFromArray(data.templates["T2"])
    moving.SetSpacing([2.0, 2.0, 2.0])
    res = mmreg.register(fixed, moving, method="mi", model=str(result.model_dir), affine=False, device="cpu", threads=1)
    disp = sitk.GetArrayFromImage(res.displacement)  # (z, y, x, 3) LPS mm: x component = ITK x = tensor dim 2
    assert float(disp[..., 0][data.training[0].labels > 0].mean()) > 2.0  # > 1 voxel of 2 mm along +x


def test_warmup_ramps_the_learning_rate_and_clipping_bounds_the_step(tmp_path):
    """warmup_steps: step k (0-based) uses learning_rate * (k + 1) / warmup_steps until the ramp ends;
    gradient_clip: the global gradient norm is clipped before Adam's step (a tiny clip, far below
    Adam's eps, leaves the weights where they were)."""
    from mmreg.training import learning_rate_at
    cfg = config_from_dict(tiny(tmp_path, learning_rate=1e-3, warmup_steps=4))
    assert [learning_rate_at(cfg, k) for k in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert learning_rate_at(config_from_dict(tiny(tmp_path)), 0) == 2e-3
    data = TrainingData(grid(), [blob("a"), blob("b", 2.0)], [], {})
    common = dict(steps=1, final_model="last", validation_every=0, checkpoint_every=0,
                  data={"sources": {"t1_t1": 1.0}}, augment=NO_AUGMENT)

    def moved(name, **kw) -> float:
        """Largest weight change of the first step."""
        torch.manual_seed(0)
        start = registration_unet(TINY_ARCH).state_dict()
        train(config_from_dict(tiny(tmp_path / name, **dict(common, **kw))), data)
        end = load_checkpoint(tmp_path / name / "model" / "training" / "last.pt")["network"]
        return max(float((end[k] - start[k]).abs().max()) for k in start)

    plain = moved("plain")
    assert 1e-3 < plain < 5e-3  # Adam's first step: about the learning rate (2e-3) per weight
    assert moved("warm", warmup_steps=100) == pytest.approx(plain / 100, rel=0.05)
    assert moved("clipped", gradient_clip=1e-12) < 1e-5


def test_checkpoint_and_resume_give_the_same_weights(tmp_path):
    data = TrainingData(grid(), [blob("a"), blob("b", 2.0)], [blob("c"), blob("d", -2.0)],
                        {"T2": 1.0 - blob("t", 1.0).image})
    base = dict(steps=6, checkpoint_every=2, validation_every=3, warmup_steps=4, gradient_clip=1.0,
                data={"sources": {"t1_t1": 1.0, "t1_template": 0.5, "t1_synth": 0.5}},
                augment={"deformation_max_mm": 4.0, "deformation_control_mm": 20.0})
    straight = train(config_from_dict(tiny(tmp_path / "a", **base)), data)
    first = train(config_from_dict(tiny(tmp_path / "b", **dict(base, steps=3))), data)
    assert first.final_step == 3
    with pytest.raises(InputError, match="--resume"):
        train(config_from_dict(tiny(tmp_path / "b", **base)), data)
    with pytest.raises(InputError, match="learning_rate"):
        train(config_from_dict(tiny(tmp_path / "b", **dict(base, learning_rate=1e-2))), data, resume=True)
    resumed = train(config_from_dict(tiny(tmp_path / "b", **base)), data, resume=True)
    assert resumed.final_step == 6
    a = load_checkpoint(tmp_path / "a" / "model" / "training" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "model" / "training" / "last.pt")
    assert a["step"] == b["step"] == 6
    for k in a["network"]:
        torch.testing.assert_close(a["network"][k], b["network"][k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(straight.history["loss"], resumed.history["loss"], rtol=1e-5)
    assert set(straight.history["source"]) >= {"t1_t1"}


def test_cancel_checkpoints_then_resume_finishes(tmp_path):
    data = TrainingData(grid(), [blob("a"), blob("b", 2.0)], [], {})
    cfg = config_from_dict(tiny(tmp_path, steps=4, data={"sources": {"t1_t1": 1.0}}, augment=NO_AUGMENT))

    def cancel_after_two(fraction, message):
        if message.startswith("step 2/"):
            raise CancelledError("cancelled by the test")
    with pytest.raises(CancelledError):
        train(cfg, data, progress=cancel_after_two)
    assert load_checkpoint(tmp_path / "model" / "training" / "last.pt")["step"] == 2
    # The stopped run's model so far is usable at once; its card says where it stopped.
    stopped = json.loads((tmp_path / "model" / "model.json").read_text())
    assert stopped["training"]["stopped_at_step"] == 2 and stopped["training"]["steps_planned"] == 4
    load_model("mi", tmp_path / "model", registration_unet)
    events, _ = read_progress(tmp_path / "model")
    assert [e["event"] for e in events if e["event"] != "step"] == ["start", "stopped"]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]
    result = train(cfg, data, resume=True)
    assert result.final_step == 4 and (result.model_dir / "model.json").is_file()
    card = json.loads((result.model_dir / "model.json").read_text())
    assert card["training"]["weights"] == "last" and card["training"]["validation"]["best"] is None
    assert "stopped_at_step" not in card["training"]
    events, _ = read_progress(tmp_path / "model")
    assert [e["event"] for e in events if e["event"] != "step"] == ["start", "stopped", "start", "done"]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4]


def test_base_model_starts_from_trained_weights_and_bad_steps_are_skipped(tmp_path, monkeypatch):
    """Fine-tuning: base_model (a model folder or a .pt file) starts the run from the trained network (one step at
    a negligible learning rate returns its weights); a wrong architecture or a missing file is an InputError naming
    it; a non-finite loss skips the step instead of poisoning the weights."""
    data = TrainingData(grid(), [blob("a"), blob("b", 2.0)], [blob("c"), blob("d", 3.0)], {})
    common = dict(data={"sources": {"t1_t1": 1.0}}, augment=NO_AUGMENT, final_model="last")
    first = train(config_from_dict(tiny(tmp_path / "a", steps=6, **common)), data)
    trained, _ = load_model("mi", first.model_dir, registration_unet)
    fresh = registration_unet(TINY_ARCH)
    assert any(not torch.allclose(a, b) for a, b in zip(trained.state_dict().values(), fresh.state_dict().values()))
    for ref in (str(first.model_dir), str(first.model_dir / "training" / "last.pt")):
        # one step at a negligible learning rate: the result is the base model's network
        tuned = train(config_from_dict(tiny(tmp_path / ref[-7:].replace("/", "_"), steps=1, learning_rate=1e-12,
                                            base_model=ref, **common)), data)
        net, _ = load_model("mi", tuned.model_dir, registration_unet)
        for k, v in trained.state_dict().items():
            torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=1e-8)
        assert ref in tuned.card.training["base_model"] or first.card.name in tuned.card.training["base_model"]
    with pytest.raises(InputError, match="does not exist"):
        train(config_from_dict(tiny(tmp_path / "x", base_model=str(tmp_path / "none.pt"), **common)), data)
    with pytest.raises(InputError, match="does not fit"):
        train(config_from_dict(tiny(tmp_path / "y", base_model=str(first.model_dir),
                                    architecture={"channels": [4, 4, 4, 4], "final_conv_channels": [4]}, **common)),
              data)
    # a "mind" model continued with intensity inputs too: the widened run starts exactly at the base's fields,
    # and the card says what it started from; the other way round (dropping an input kind) does not fit
    mind_arch = dict(TINY_ARCH, input_features="mind")
    mind = train(config_from_dict(tiny(tmp_path / "m", steps=2, architecture=mind_arch, **common)), data)
    widened = train(config_from_dict(tiny(tmp_path / "w", steps=1, learning_rate=1e-12, base_model=str(mind.model_dir),
                                          architecture=dict(mind_arch, input_features="intensity_and_mind"), **common)),
                    data)
    base_net, _ = load_model("mi", mind.model_dir, registration_unet)
    wide_net, wide_card = load_model("mi", widened.model_dir, registration_unet)
    assert wide_card.architecture["input_features"] == "intensity_and_mind"
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(wide_net(x), base_net(x), rtol=0, atol=1e-5)
    assert mind.card.name in widened.card.training["base_model"]
    with pytest.raises(InputError, match="does not fit.*reads mind input features"):
        train(config_from_dict(tiny(tmp_path / "v", base_model=str(mind.model_dir), **common)), data)

    import mmreg.methods.mi
    real = mmreg.methods.mi.training_loss
    calls = []

    def sometimes_nan(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        if torch.is_inference_mode_enabled():  # validation: left alone
            return loss, parts
        calls.append(1)
        return (loss * float("nan"), parts) if len(calls) == 2 else (loss, parts)
    monkeypatch.setattr(mmreg.methods.mi, "training_loss", sometimes_nan)
    result = train(config_from_dict(tiny(tmp_path / "z", steps=3, **common)), data)
    assert result.card.training["skipped_steps"] == 1
    net, _ = load_model("mi", result.model_dir, registration_unet)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_missing_sources_are_input_errors(tmp_path):
    data = TrainingData(grid(), [blob("a")], [], {})
    with pytest.raises(InputError, match="t1_t1 needs at least 2"):
        train(config_from_dict(tiny(tmp_path, data={"sources": {"t1_t1": 1.0}})), data)
    with pytest.raises(InputError, match="t1_template needs templates"):
        train(config_from_dict(tiny(tmp_path, data={"sources": {"t1_template": 1.0}})), data)


def test_cli_train_stops_on_sigterm_like_ctrl_c(tmp_path, monkeypatch, capsys):
    """A SIGTERM (cluster scheduler, `kill`) during `mmreg train` reaches train() as KeyboardInterrupt, which
    checkpoints; the command exits 130 and the previous SIGTERM handler is restored."""
    import os
    import signal
    import time

    import mmreg.training
    from mmreg.cli import main
    seen = []

    def fake_train(cfg, **kw):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2.0)  # the handler runs here at the latest
        except KeyboardInterrupt:
            seen.append("checkpoint")  # what train() does before re-raising
            raise
        raise AssertionError("SIGTERM did not interrupt")
    monkeypatch.setattr(mmreg.training, "train", fake_train)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'output = "{(tmp_path / "m").as_posix()}"\nsteps = 2\n')
    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", str(cfg), "--quiet"]) == 130
    assert seen == ["checkpoint"] and signal.getsignal(signal.SIGTERM) == before
    assert "cancelled" in capsys.readouterr().err


def test_cli_train_runs_and_reports(tmp_path, monkeypatch, capsys):
    """The command: a config with an unknown key is exit code 2 with the key named."""
    from mmreg.cli import main
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    assert main(["train", str(bad), "--quiet"]) == 2
    assert "stepz" in capsys.readouterr().err


# ----------------------------------------------------------------------------- shared data


@pytest.mark.shared_data
def test_ixi_preparation_and_two_steps(shared_data, tmp_path, monkeypatch):
    """2 IXI subjects (1 training, 1 validation) + avg152 T2 on the 3 mm template grid, 2 steps."""
    monkeypatch.setenv("MMREG_CACHE", str(tmp_path / "cache"))
    cfg = config_from_dict({
        "name": "ixi2", "output": str(tmp_path / "model"), "spacing_mm": 3.0, "steps": 2, "threads": 2,
        "device": "cpu", "validation_every": 0, "checkpoint_every": 0,
        "data": {"root": str(shared_data), "training_subjects": ["IXI012"], "validation_subjects": ["IXI013"],
                 "template_modalities": ["T2"], "sources": {"t1_template": 1.0, "t1_synth": 1.0}}})
    data = prepare_ixi(cfg)
    assert data.grid.spatial_shape == (64, 80, 64)
    assert [s.id for s in data.training] == ["IXI012"] and [s.id for s in data.validation] == ["IXI013"]
    t1 = data.training[0]
    assert 0.0 <= t1.image.min() and t1.image.max() <= 1.0 and t1.labels.max() > 100
    # Aligned to the template: the subject's brain overlaps the template's T2 brain.
    brain, t2 = t1.labels > 0, data.templates["T2"] > 0.2
    assert (brain & t2).sum() / brain.sum() > 0.8
    again = prepare_ixi(cfg)  # from the cache
    np.testing.assert_array_equal(again.training[0].labels, t1.labels)
    result = train(cfg, data)
    assert result.final_step == 2
    val = result.card.training["validation"]
    assert 0.2 < val["identity_mean_dice"] < 0.9 and len(val["history"]) == 2
