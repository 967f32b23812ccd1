"""The benchmark harness on a tiny synthetic case: the scoring path, the peers' directions, the report."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from mmreg.bench import harness
from mmreg.bench.cases import Case, apply_known_deformation, random_smooth_deformation
from mmreg.bench.peers import PeerResult
from mmreg.errors import InputError
from mmreg.metrics import label_overlap_report
from mmreg.transforms import displacement_transform


def _blobs(size=(40, 40, 40), spacing=2.0):
    """An image with three ellipsoids of different intensity, and their label map (1, 2, 3)."""
    z, y, x = np.mgrid[:size[2], :size[1], :size[0]].astype(float)
    centres = [(14, 20, 20, 7, 9, 8), (26, 18, 22, 6, 6, 9), (20, 28, 14, 5, 7, 6)]
    labels = np.zeros(z.shape, np.uint8)
    for k, (cx, cy, cz, rx, ry, rz) in enumerate(centres, start=1):
        labels[((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1] = k
    image = np.choose(labels, [0.0, 1.0, 0.6, 0.3]).astype(np.float32)
    image = image + 0.02 * np.sin(x / 3.0) * np.cos(y / 4.0)  # some texture for the metrics
    img = sitk.GetImageFromArray(image)
    lab = sitk.GetImageFromArray(labels)
    for i in (img, lab):
        i.SetSpacing((spacing,) * 3)
        i.SetOrigin((-40.0, -35.0, -30.0))
    return sitk.SmoothingRecursiveGaussian(img, 1.0), lab


@pytest.fixture(scope="module")
def case():
    fixed, labels = _blobs()
    deformation = random_smooth_deformation(fixed, seed=3, max_displacement_mm=6.0, control_spacing_mm=30.0,
                                            mask=labels > 0)
    return Case(name="blobs<-warped", group="synthetic", fixed=fixed, moving=apply_known_deformation(fixed, deformation),
                fixed_labels=labels, moving_labels=apply_known_deformation(labels, deformation, labels=True),
                label_ids=[1, 2, 3], true_displacement=deformation.inverse, fixed_modality="MR",
                moving_modality="MR", mono_modal=True, notes="synthetic")


@pytest.fixture
def identity_affine(monkeypatch):
    """The affine step returns the identity, so 'affine only' is exactly 'no registration'."""
    class Identity:
        transform = sitk.AffineTransform(3)

        def as_dict(self):
            return {"mattes_mi_before": None, "mattes_mi_after": None, "seconds": 0.0}
    monkeypatch.setattr(harness, "affine_prealign", lambda fixed, moving: Identity())


def _truth(ctx: harness.MethodContext) -> PeerResult:
    """An oracle: the deformable part v with A(x + v(x)) = x + u_true(x), v(x) = A^-1(x + u_true(x)) - x."""
    u = sitk.GetArrayFromImage(ctx.case.true_displacement)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in ctx.fixed.GetSize()[::-1]], indexing="ij")[::-1], -1)
    direction = np.array(ctx.fixed.GetDirection()).reshape(3, 3)
    x = np.array(ctx.fixed.GetOrigin()) + (idx * np.array(ctx.fixed.GetSpacing())) @ direction.T
    a = ctx.affine
    m, c, t = np.array(a.GetMatrix()).reshape(3, 3), np.array(a.GetCenter()), np.array(a.GetTranslation())
    v = (x + u - c - t) @ np.linalg.inv(m).T + c - x
    img = sitk.GetImageFromArray(v, isVector=True)
    img.CopyInformation(ctx.fixed)
    return PeerResult(img, 0.01, {"method": "ground truth"}, {"core_s": 0.01})


@pytest.fixture
def truth_method():
    harness.register_bench_method("truth", _truth, "ground truth")
    yield "truth"
    harness.unregister_bench_method("truth")


def _rows(run):
    return {r["method"]: r for r in run.records}


def test_known_deformation_scores_dice_one_and_zero_epe(case, truth_method):
    # With the real affine step: the oracle's deformable part is built through the affine the harness chose.
    run = harness.run_case(case, ["affine", "truth"], threads=1, cache_dir=None)
    rows = _rows(run)
    assert rows["truth"]["mean_dice"] > 0.97  # nearest-neighbour moving labels + linear label warping: not exactly 1
    assert rows["truth"]["epe_mean_mm"] < 0.05 and rows["truth"]["epe_p95_mm"] < 0.1
    assert rows["truth"]["folding_percent_mask"] == 0.0  # the numerical inverse folds a little at the border only
    assert rows["affine"]["epe_mean_mm"] > 0.5  # the affine takes up part of it; measured 0.77 mm left
    assert rows["truth"]["mean_dice"] > rows["affine"]["mean_dice"] + 0.04  # measured 0.924 -> 0.974


def test_identity_gives_the_pre_registration_dice(case, identity_affine):
    run = harness.run_case(case, ["affine"], threads=1, cache_dir=None)
    before = label_overlap_report(case.fixed_label_map(), case.moving_label_map(), labels=[1, 2, 3])
    row = _rows(run)["affine"]
    assert row["mean_dice"] == pytest.approx(before["mean_dice"], abs=1e-6)
    for k, v in before["dice"].items():
        assert row["dice"][k] == pytest.approx(v, abs=1e-6)
    # the EPE of "no registration" is the size of the true displacement
    u = np.linalg.norm(sitk.GetArrayFromImage(case.true_displacement), axis=-1)
    assert row["epe_mean_mm"] == pytest.approx(float(u[sitk.GetArrayFromImage(case.fixed_label_map()) > 0].mean()),
                                               rel=1e-6)


@pytest.mark.parametrize("peer", ["ants", "elastix"])
def test_peer_field_is_read_in_the_right_direction(case, identity_affine, peer):
    pytest.importorskip({"ants": "ants", "elastix": "itk"}[peer])
    fast = {"elastix": {"resolutions": 2, "iterations": 150}}  # 40^3 voxels need no 4-level pyramid
    run = harness.run_case(case, ["affine", peer], threads=1, cache_dir=None, options=fast)
    rows = _rows(run)
    check = rows[peer]["convention_check"]
    assert check["convention_ok"], check  # the dense field reproduces the peer's own warped image
    assert check["relative_mad_field"] < 1e-3 < check["relative_mad_negated_field"]
    # and it registers: Dice up, endpoint error down (measured: ANTs 0.82 -> 0.94, elastix 0.82 -> 0.93)
    assert rows[peer]["mean_dice"] > rows["affine"]["mean_dice"] + 0.08
    assert rows[peer]["epe_mean_mm"] < 0.6 * rows["affine"]["epe_mean_mm"]


def test_repeats_time_every_method_and_measure_memory(case, identity_affine):
    def allocate(ctx):
        block = np.ones(40 * 2**20 // 8)  # 40 MB
        res = harness._run_affine(ctx)
        res.seconds = float(block[0])
        return res
    harness.register_bench_method("alloc", allocate)
    try:
        run = harness.run_case(case, ["affine", "alloc"], threads=1, cache_dir=None, repeats=3)
    finally:
        harness.unregister_bench_method("alloc")
    row = _rows(run)["alloc"]
    assert row["seconds_repeats"] == [1.0, 1.0, 1.0] and row["seconds"] == 1.0
    assert row["memory_increase_mb"] >= 39
    assert row["peak_memory_mb"] >= row["baseline_memory_mb"] + 39


def test_summary_ratios_and_gains():
    recs = []
    for case, (a, e, o, te, to) in {"c1": (0.5, 0.6, 0.7, 20.0, 10.0), "c2": (0.4, 0.45, 0.6, 30.0, 6.0),
                                     "c3": (0.6, 0.55, 0.65, 10.0, 10.0)}.items():
        for method, dice, sec in (("affine", a, 0.0), ("elastix", e, te), ("optimize", o, to)):
            recs.append({"case": case, "group": "g", "method": method, "mean_dice": dice, "seconds": sec,
                         "core_seconds": sec, "peak_memory_mb": 100.0, "memory_increase_mb": 1.0})
    rows = {(s["group"], s["method"]): s for s in harness.summarise(recs)}
    opt = rows[("all", "optimize")]
    assert opt["time_ratio_to_elastix"] == pytest.approx(0.5)  # median of 0.5, 0.2, 1.0
    assert opt["dice_gain"] == pytest.approx(0.2)  # median of 0.2, 0.2, 0.05
    assert rows[("g", "elastix")]["dice_gain"] == pytest.approx(0.05)
    assert "time_ratio_to_ants" not in opt  # only peers of this run
    text = harness.findings(harness.summarise(recs), {})
    assert text == []  # medians above affine everywhere


def test_unknown_method_and_options_are_clear_errors():
    with pytest.raises(InputError, match="Unknown benchmark method 'voxelmorph'.*ants.*elastix@SPACING"):
        harness.resolve_method("voxelmorph")
    with pytest.raises(InputError, match="'optimize' has no refinement"):
        harness.resolve_method("optimize+refine")
    refined = harness.resolve_method("mi+refine20")
    assert (refined.label, refined.kind) == ("mmreg mi + 20 refinement steps", "mmreg")
    assert harness.resolve_method("mi+refine").label.endswith(f" {harness.DEFAULT_REFINEMENT_STEPS} refinement steps")
    with pytest.raises(InputError, match="METHOD=JSON"):
        harness._parse_options(["optimize"])
    with pytest.raises(InputError, match="not JSON"):
        harness._parse_options(["optimize={levels: 2}"])


def test_report_and_figures_written(case, identity_affine, truth_method, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(harness, "build_cases", lambda specs, root=None: [case])
    parser = harness.add_arguments(__import__("argparse").ArgumentParser())
    args = parser.parse_args(["--cases", "synthetic", "--methods", "truth", "--out", str(tmp_path / "b.md"),
                              "--cache", "none", "--threads", "1"])
    out = harness.run_benchmark(args, "test")
    text = out.read_text()
    data = json.loads((tmp_path / "b.json").read_text())
    assert [r["method"] for r in data["results"]] == ["affine", "truth"]  # affine always added: the reference
    assert "| synthetic | ground truth | 1 |" in text and "![dice_boxplot]" in text
    pngs = sorted(p.name for p in (tmp_path / "b").glob("*.png"))
    assert pngs == ["case_blobs_-warped.png", "dice_boxplot.png", "runtime.png"]
    # --resume keeps the rows and runs nothing again
    args.resume = True
    harness.run_benchmark(args, "test")
    assert len(json.loads((tmp_path / "b.json").read_text())["results"]) == 2
    # a method whose rows were dropped runs again, and its new settings replace the resumed ones (a retrained
    # model's checksum must not stay the old one's)
    data = json.loads((tmp_path / "b.json").read_text())
    data["results"] = [r for r in data["results"] if r["method"] != "truth"]
    data["settings"]["truth"] = {"label": "stale", "kind": "mmreg", "model": {"sha256": "old"}}
    (tmp_path / "b.json").write_text(json.dumps(data))
    harness.run_benchmark(args, "test")
    data = json.loads((tmp_path / "b.json").read_text())
    assert len(data["results"]) == 2 and data["settings"]["truth"]["label"] == "ground truth"


def test_bench_command_bad_method_exit_code(capsys):
    from mmreg.cli import main
    assert main(["bench", "--methods", "affine,voxelmorph", "--cases", "spine"]) == 2
    assert "Unknown benchmark method 'voxelmorph'" in capsys.readouterr().err


@pytest.mark.shared_data
def test_bench_command_on_the_spinal_cord(shared_data, tmp_path):
    from mmreg.cli import main
    out = tmp_path / "bench.md"
    assert main(["bench", "--cases", "spine", "--methods", "affine,optimize", "--no-plots", "--threads", "2",
                 "--out", str(out), "--cache", str(tmp_path / "cache"), "--data", str(shared_data)]) == 0
    rows = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())["results"]}
    # measured: cord Dice 0.853 after affine -> 0.907 with optimize, no folding
    assert rows["affine"]["mean_dice"] > 0.8
    assert rows["optimize"]["mean_dice"] > rows["affine"]["mean_dice"] + 0.02
    assert rows["optimize"]["folding_percent"] < 0.01
    assert "| spine T2<-T1 | spinal cord T2<-T1 | mmreg optimize |" in out.read_text()


def test_grad_variants_pick_the_ct_model_on_ct_cases_when_installed(tmp_path, monkeypatch):
    import torch
    from mmreg.models import ModelCard, save_model
    from mmreg.networks import DEFAULT_GRAD_ARCHITECTURE, gradnet
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "user"))
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(tmp_path / "shipped"))
    small = dict(DEFAULT_GRAD_ARCHITECTURE, channels=[4] * 8, final_conv_channels=[4])
    for name in ("grad_mr_gated", "grad_ctmr_gated", "grad_mr_vm"):
        arch = dict(small, variant="vm" if name.endswith("vm") else "gated")
        torch.manual_seed(0)
        save_model(tmp_path / "user" / "grad" / name, gradnet(arch),
                   ModelCard(name=name, method="grad", architecture=arch, spacing_mm=4.0, multiple=16, diffeomorphic=False))
    assert harness.grad_model_for("gated", "template CT<-T1 (known)") == "grad_ctmr_gated"
    assert harness.grad_model_for("gated", "abdomen MR<-CT") == "grad_ctmr_gated"
    assert harness.grad_model_for("gated", "template T1<-T2 (known)") == "grad_mr_gated"
    assert harness.grad_model_for("vm", "template CT<-T1 (known)") == "grad_mr_vm"  # no CT-MR VM model: the MR one
    refined = harness.resolve_method("grad-vmconcat+refine20")
    assert (refined.label, refined.kind) == ("mmreg grad, VM(concat) baseline + 20 refinement steps", "mmreg")
    assert harness.resolve_method("grad").label == "mmreg grad, gated fusion"
    assert {"grad", "grad+refine"} <= set(harness.default_methods())


def test_default_methods_skip_learned_methods_without_a_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "user"))
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(tmp_path / "shipped"))
    methods = harness.default_methods()
    assert methods[:3] == ["affine", "ants", "elastix"] and "optimize" in methods and "mi" not in methods
    assert not any(m.endswith("+refine") for m in methods)


def test_learned_method_and_refinement_are_recorded_in_the_model_card(case, identity_affine, tmp_path, monkeypatch):
    import torch

    from mmreg.models import ModelCard, save_model
    from mmreg.networks import DEFAULT_ARCHITECTURE, registration_unet, size_multiple
    monkeypatch.setenv("MMREG_MODELS", str(tmp_path / "user"))
    monkeypatch.setenv("MMREG_SHIPPED_MODELS", str(tmp_path / "shipped"))
    arch = dict(DEFAULT_ARCHITECTURE, channels=[8, 8, 8, 8], final_conv_channels=[8])
    torch.manual_seed(0)
    folder = save_model(tmp_path / "shipped" / "mi" / "tiny", registration_unet(arch),
                        ModelCard(name="tiny", method="mi", architecture=arch, spacing_mm=4.0,
                                  multiple=size_multiple(arch),
                                  training={"data": {"training_subjects": [case.name[:4]]}}))
    defaults = harness.default_methods()
    assert defaults[defaults.index("mi"):defaults.index("mi") + 2] == ["mi", "mi+refine"]
    # Without the shipped learned metrics, the metric pipeline is benchmarked with MI only.
    assert "metric-mi" in defaults and "metric" not in defaults
    monkeypatch.setattr(harness, "build_cases", lambda specs, root=None: [case])
    parser = harness.add_arguments(__import__("argparse").ArgumentParser())
    args = parser.parse_args(["--cases", "synthetic", "--methods", "mi,mi+refine10", "--out", str(tmp_path / "b.md"),
                              "--cache", "none", "--threads", "1", "--no-plots", "--record-models"])
    harness.run_benchmark(args, "mmreg bench test")
    data = json.loads((tmp_path / "b.json").read_text())
    model = data["settings"]["mi"]["model"]
    assert model["path"] == "<shipped models>/mi/tiny" and model["name"] == "tiny"
    assert data["settings"]["mi+refine10"]["options"]["refinement_steps"] == 10
    rows = {r["method"]: r for r in data["results"]}
    # the untrained network is the identity: affine's Dice; ten refinement steps improve it
    assert abs(rows["mi"]["mean_dice"] - rows["affine"]["mean_dice"]) < 0.01
    assert rows["mi+refine10"]["mean_dice"] > rows["affine"]["mean_dice"] + 0.01
    card = json.loads((folder / "model.json").read_text())
    assert set(card["benchmark"]) == {"mi", "mi+refine10"}
    recorded = card["benchmark"]["mi+refine10"]["by_group"]["synthetic"]
    assert recorded["mean_dice"] == pytest.approx(rows["mi+refine10"]["mean_dice"])
    assert card["benchmark"]["mi"]["reference_dice_by_group"]["all"]["affine"] == pytest.approx(
        rows["affine"]["mean_dice"])
    from mmreg.models import load_model, local_model_path
    load_model("mi", "tiny", registration_unet, "cpu")  # the checksum still matches: only the card changed
    assert local_model_path(model["path"]) == tmp_path / "shipped" / "mi" / "tiny"
    # the report says which cases contain the model's training subjects
    text = (tmp_path / "b.md").read_text()
    assert f"the cases {case.name} contain training subjects" in text


def test_ixi_template_cases_take_the_t1_template_and_any_subject(shared_data):
    """ixi-template:T1|T2|PD[:SUBJECT]: the T1 case is the same inter-subject pair as the T2 one in one contrast
    (same fixed image, same template labels), marked mono-modal; bad modality or subject are InputErrors."""
    from mmreg.bench.cases import build_cases
    t1, t2 = build_cases("ixi-template:T1:ixi049 ixi-template:T2:IXI049", shared_data)
    assert (t1.name, t2.name) == ("IXI049<-avg152T1", "IXI049<-avg152T2")
    assert t1.mono_modal and not t2.mono_modal and t1.fixed == t2.fixed and t1.label_ids == t2.label_ids
    assert np.array_equal(sitk.GetArrayFromImage(t1.moving_labels), sitk.GetArrayFromImage(t2.moving_labels))
    assert build_cases("ixi-template:PD", shared_data)[0].name == "IXI012<-avg152PD"
    with pytest.raises(InputError, match="unknown subject 'IXI999'"):
        build_cases("ixi-template:T2:IXI999", shared_data)
    with pytest.raises(InputError, match="'T1', 'T2' or 'PD'"):
        build_cases("ixi-template:CT", shared_data)


def test_swapped_cases_exchange_images_labels_and_modalities(shared_data):
    from mmreg.bench.cases import build_cases, swapped_case
    (plain,) = build_cases("ixi-template:T2", shared_data)
    assert [c.name for c in build_cases("swap:ixi-template:T2", shared_data)] == [plain.name + "~swapped"]
    swapped = swapped_case(plain)
    assert swapped.name == plain.name + "~swapped" and swapped.info["swapped"] is True
    assert swapped.fixed is plain.moving and swapped.moving is plain.fixed
    assert swapped.fixed_labels is plain.moving_labels and swapped.moving_labels is plain.fixed_labels
    assert swapped.true_displacement is None and swapped.scored_labels() == plain.scored_labels()


def test_a_users_model_is_named_in_the_label_not_the_default_models_description():
    # "mmreg multiscale (3 scales)" describes the shipped default; a 1-scale model given with --options
    # was labelled "3 scales" in a benchmark table.
    method = harness.resolve_method("multiscale")
    assert harness._label(method, {}, {"model": {"name": "multiscale_brain"}}) == "mmreg multiscale (3 scales)"
    assert (harness._label(method, {"model": "/runs/out_1scale"}, {"model": {"name": "ms_1scale_seed1"}})
            == "mmreg multiscale, model 'ms_1scale_seed1'")
    assert harness._label(method, {"model": "/runs/x"}, {}) == "mmreg multiscale, model '/runs/x'"
    # a refined run keeps its number of steps in the label
    refined = harness.resolve_method("multiscale+refine20")
    assert (harness._label(refined, {"model": "/runs/x"}, {"model": {"name": "ms_seed1"}})
            == "mmreg multiscale + 20 refinement steps, model 'ms_seed1'")
    # other options of the user's are named too
    mi = harness.resolve_method("mi")
    assert harness._label(mi, {"symmetric": True}, {}) == "mmreg mi, symmetric=true"
    assert (harness._label(mi, {"model": "/m", "symmetric": True}, {"model": {"name": "x"}})
            == "mmreg mi, model 'x', symmetric=true")
