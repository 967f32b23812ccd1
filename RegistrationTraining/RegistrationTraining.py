"""RegistrationTraining: fine-tune a learned registration method on your own image pairs.

The training itself is the engine's command ``mmreg train`` (the same from a shell), run in a
separate Python process so that Slicer stays usable for the minutes or hours it takes. This
module collects the data (pairs of volumes from the scene, or a manifest file) and the choices,
starts/stops/resumes that process, and shows its progress (progress bar with the time left, a
loss curve and the validation Dice, as MRML tables and plots). The model it writes goes into
the user model folder, where every method module's model selector lists it.

From the Slicer Python console, without the panel::

    logic = slicer.util.getModuleLogic("RegistrationTraining")
    pairs = [ScenePair(fixedVolume, movingVolume, fixedSegmentation, movingSegmentation), ...]
    run = logic.start_from_scene("mi", pairs, "my_model", iterations=500)      # or:
    run = logic.start("mi", "/data/manifest.csv", "my_model", iterations=500, device="cuda")
    run.wait(on_events=print)        # or logic.poll() from a timer; run.stop(); logic.resume(...)
    logic.rename_model("mi", "my_model", "liver_ct_mr"); logic.delete_model("mi", "liver_ct_mr")

(``ScenePair`` is in this module: ``from RegistrationTraining import ScenePair``.)

Joint registration-segmentation (the FMIRNet paper's label propagation; panel section "Joint
registration-segmentation"): a few annotated volumes (each with a segmentation or labelmap) and many
unannotated ones; the registration method (default ``multiscale``) propagates every annotated volume's labels
to every unannotated one, and a segmentation U-Net is trained on the annotated plus the propagated labels, by
``mmreg joint-seg`` in a separate process (progress, Stop: nothing is written)::

    run = logic.start_joint_segmentation([(volume1, segmentation1), (volume2, labelmap2)], [volume3, volume4],
                                         "my_segmenter", steps=400)   # method="multiscale", spacing=3.0
    run.wait(on_events=print)          # or logic.poll_joint() from a timer; logic.stop_joint()
    segmentation = logic.segment_volume(newVolume, "my_segmenter")   # a new segmentation node, segments by name

In a shell: ``mmreg joint-seg --annotated IMG:LAB ... --unannotated IMG ... -o DIR`` and
``mmreg segment DIR IMAGE -o LABELS``.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import slicer
import vtk
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MMRegCommonLib.module import configure_module
from RegistrationTrainingLib import panelstate
from RegistrationTrainingLib.runner import EXIT_DONE, EXIT_STOPPED, TrainingChoices, TrainingRun, child_environment
from RegistrationTrainingLib.runner import train_command
from RegistrationTrainingLib.jointseg import SEGMENT_NAMES, JointSegmentationRun, joint_seg_command

#: Combo boxes the Widget fills at run time (bound by MMRegCommonLib.combos, not by parameterNodeWrapper).
COMBO_PARAMETERS = ("method", "dataSource", "baseModel", "device")
#: Parameter-node entries (outside the wrapper's fields) that hold the scene pairs.
_PAIR_COUNT = "trainingPairCount"
_PAIR_KEYS = ("fixed", "moving", "fixed_labels", "moving_labels")
#: Parameter-node entries (outside the wrapper's fields) that hold the annotated volumes of the joint segmentation.
_ANNOTATED_COUNT = "jointAnnotatedCount"
_ANNOTATED_KEYS = ("volume", "labels")


class RegistrationTraining(ScriptedLoadableModule):
    """Module description shown by Slicer (title, category, help)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        configure_module(
            self.parent, "RegistrationTraining", "Registration Training", "",
            "Fine-tune a learned registration method (e.g. the MI CNN) on your own image pairs, then use the new "
            "model from the method's module. Training runs in a separate process: Slicer stays usable, and a "
            "stopped or interrupted run resumes from its last checkpoint. It also trains a segmentation network from "
            "a few annotated volumes plus labels propagated by registration (joint registration-segmentation).",
            usage=(
                "<p><b>Data</b>: add pairs of volumes from the scene (fixed, moving, and optionally a segmentation "
                "or labelmap of each, which gives the validation Dice; segments are matched by name across pairs), "
                "or choose a manifest file (CSV or JSON with the columns fixed, moving, fixed_labels, "
                "moving_labels, fixed_modality, moving_modality, split). Pairs without a split are divided "
                "automatically (validation fraction).</p>"
                "<p><b>Model</b>: the method, the model to start from (its default model, another trained model, "
                "or none), and the new model's name. <b>Training options</b>: steps, learning rate, batch size, "
                "network grid spacing, augmentation, smoothness weight, device.</p>"
                "<p><b>Start</b> trains, <b>Stop</b> ends after the current step and keeps a checkpoint, "
                "<b>Resume</b> continues a stopped or interrupted run (also after restarting Slicer). The loss and "
                "validation Dice curves are tables and plots in the scene. The model is saved in the user model "
                "folder (<code>$MMREG_MODELS</code>, default <code>~/.mmreg/models</code>) and appears in the "
                "method module's model selector; rename or delete it under <b>Trained models</b>.</p>"
                "<p><b>Python console</b>: <code>logic = slicer.util.getModuleLogic('RegistrationTraining'); "
                "run = logic.start('mi', 'manifest.csv', 'my_model', iterations=500); run.wait()</code>. "
                "In a shell: <code>mmreg train --method mi --data manifest.csv --name my_model</code>.</p>"
                "<p><b>Joint registration-segmentation</b> (collapsed section): add a few annotated volumes with their "
                "segmentation or labelmap and check the unannotated volumes; Start propagates the labels to the "
                "unannotated volumes by registration (default method <code>multiscale</code>) and trains a "
                "segmentation U-Net on the annotated and propagated labels, in a separate process (Stop writes "
                "nothing). <b>Segment volume</b> then segments any volume with that segmenter into a new "
                "segmentation node, segments named as in the annotations. Console: "
                "<code>logic.start_joint_segmentation([(vol, seg)], [vol2, vol3], 'my_segmenter')</code>, "
                "<code>logic.segment_volume(vol4, 'my_segmenter')</code>; shell: <code>mmreg joint-seg</code>, "
                "<code>mmreg segment</code>.</p>"))


@parameterNodeWrapper
class RegistrationTrainingParameterNode:
    """The panel's parameters (saved with the scene).

    Data: ``dataSource`` ("scene": pairs of the scene, kept as node references in the same
    parameter node, see :meth:`RegistrationTrainingLogic.scene_pairs`; "manifest":
    ``manifestPath``), ``validationFraction`` (share of the pairs without a split held out).
    Model: ``method``, ``baseModel`` ("" = the method's default model, "-" = from scratch, or a
    model name), ``modelName``. Options: ``iterations``, ``learningRate``, ``batchSize``,
    ``spacing`` (network grid, mm; 0: the base model's, 2 mm from scratch), ``augment``,
    ``smoothness``, ``device``, ``threads`` (0: the engine decides).
    """

    method: str = "mi"
    dataSource: str = "scene"
    manifestPath: str = ""
    validationFraction: Annotated[float, WithinRange(0.0, 0.9)] = 0.2
    baseModel: str = ""
    modelName: str = "my_model"
    iterations: Annotated[int, WithinRange(1, 1000000)] = 1000
    learningRate: Annotated[float, WithinRange(0.0, 1.0)] = 0.0001
    batchSize: Annotated[int, WithinRange(1, 64)] = 1
    spacing: Annotated[float, WithinRange(0.0, 20.0)] = 0.0
    augment: bool = True
    smoothness: Annotated[float, WithinRange(0.0, 100.0)] = 1.0
    device: str = "auto"
    threads: Annotated[int, WithinRange(0, 256)] = 0
    # Joint registration-segmentation (the annotated volumes and their labels are node references kept like the
    # training pairs, see RegistrationTrainingLogic.joint_annotated).
    jointUnannotatedVolumes: list[slicer.vtkMRMLScalarVolumeNode]
    jointMethod: str = "multiscale"
    jointModel: str = ""
    jointSteps: Annotated[int, WithinRange(1, 1000000)] = 400
    jointSpacing: Annotated[float, WithinRange(0.5, 20.0)] = 3.0
    jointSegmenterName: str = "my_segmenter"
    jointOutputFolder: str = ""
    segmentVolume: slicer.vtkMRMLScalarVolumeNode
    segmenterPath: str = ""


@dataclass
class AnnotatedVolume:
    """An annotated volume of the joint registration-segmentation: a scalar ``volume`` and its ``labels``
    (a segmentation or a labelmap volume node on it)."""

    volume: object
    labels: object


@dataclass
class ScenePair:
    """One training pair of scene nodes: ``fixed`` / ``moving`` scalar volumes and, optionally,
    ``fixed_labels`` / ``moving_labels`` (segmentation or labelmap volume nodes on those images,
    for the validation Dice). ``*_modality``: "auto", "MR" or "CT"; ``split``: "train",
    "validation" or "" (automatic)."""

    fixed: object
    moving: object
    fixed_labels: object = None
    moving_labels: object = None
    fixed_modality: str = "auto"
    moving_modality: str = "auto"
    split: str = ""


def _read_reference_list(parameters, prefix: str, count_key: str, keys, required) -> list:
    """A list kept in the parameter node as node references ``<prefix><i>_<key>`` (its length in ``count_key``):
    one ``{key: node or None}`` per entry, leaving out entries where a ``required`` node was deleted."""
    node = _raw_node(parameters)
    out = []
    for i in range(int(node.GetParameter(count_key) or 0)):
        refs = {key: node.GetNodeReference(f"{prefix}{i}_{key}") for key in keys}
        if all(refs[key] is not None for key in required):
            out.append(refs)
    return out


def _write_reference_list(parameters, prefix: str, count_key: str, keys, entries) -> None:
    """Keep ``entries`` (objects with attributes ``keys``, each a node or None) in the parameter node as node
    references (saved and restored with the scene), replacing the list there; one Modified event in all."""
    node = _raw_node(parameters)
    wasModifying = node.StartModify()  # one Modified event for the whole list (the panel redraws once)
    try:
        for i in range(int(node.GetParameter(count_key) or 0)):
            for key in keys:
                node.RemoveNodeReferenceIDs(f"{prefix}{i}_{key}")
        for i, entry in enumerate(entries):
            for key in keys:
                value = getattr(entry, key)
                if value is not None:
                    node.SetNodeReferenceID(f"{prefix}{i}_{key}", value.GetID())
        node.SetParameter(count_key, str(len(entries)))
    finally:
        node.EndModify(wasModifying)


def _raw_node(parameters):
    """The ``vtkMRMLScriptedModuleNode`` behind a parameterNodeWrapper (or the node itself)."""
    return getattr(parameters, "parameterNode", parameters)


class RegistrationTrainingLogic(ScriptedLoadableModuleLogic):
    """Training from the scene or from files, without the panel (Slicer console, self-test).

    :meth:`start` / :meth:`start_from_scene` / :meth:`resume` return a
    :class:`~RegistrationTrainingLib.runner.TrainingRun` (``poll()``, ``stop()``, ``wait()``,
    ``returncode``, ``progress``); :meth:`poll` also updates the loss and Dice tables and plots.
    One run at a time per Logic. Bad input raises ``mmreg.InputError`` with a readable message.
    """

    parameterNodeClass = RegistrationTrainingParameterNode

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.run = None
        self._curves = {}
        self.joint_run = None

    def getParameterNode(self):
        """The module's parameter node, wrapped in :class:`RegistrationTrainingParameterNode`."""
        return self.parameterNodeClass(ScriptedLoadableModuleLogic.getParameterNode(self))

    @property
    def is_running(self) -> bool:
        """True while this Logic's last run has not ended (as of the last poll)."""
        return self.run is not None and self.run.running

    # ------------------------------------------------------------------ engine queries
    @staticmethod
    def trainable_methods() -> list:
        """The engine's trainable methods (``mmreg.training.trainable_methods``; ImportError without the engine)."""
        from mmreg.training import trainable_methods
        return list(trainable_methods())

    @staticmethod
    def list_models(method: str) -> list:
        """Shipped and user models of ``method`` (:func:`mmreg.models.list_models`)."""
        from mmreg.models import list_models
        return list_models(method)

    @staticmethod
    def default_model(method: str) -> str | None:
        """The model ``method`` uses when none is chosen: the method's own default when installed (e.g. ``mi``:
        mi_brain), else "default" or the only model; None when it has none or it is ambiguous."""
        from mmreg.methods import get_method
        from mmreg.models import default_model_name, list_models
        chosen = getattr(get_method(method), "chosen_model", None)
        name = chosen({}) if chosen is not None else None
        return name if name is not None else default_model_name([m["name"] for m in list_models(method)])

    @staticmethod
    def output_folder(method: str, name: str, output=None):
        """Where the run of model ``name`` writes (``output``, default the user model folder)."""
        if output:
            return Path(output).expanduser()
        from mmreg.training import default_output
        return Path(default_output(method, name))

    def can_resume(self, method: str, name: str, output=None) -> bool:
        """True when a stopped or interrupted run of ``name`` left a checkpoint to resume from."""
        if panelstate.name_problem(name):
            return False
        from mmreg.training import can_resume
        return bool(can_resume(self.output_folder(method, name, output)))

    @staticmethod
    def work_folder(method: str, name: str) -> Path:
        """Where the scene pairs of model ``name`` are exported and the process's console output goes:
        ``<user models>/.training-work/<method>/<name>`` (kept, so a resume after a restart finds its
        data; deleted with the model by :meth:`delete_model`)."""
        from mmreg.models import user_model_root
        return Path(user_model_root()) / ".training-work" / method / name

    # ------------------------------------------------------------------ scene pairs
    def scene_pairs(self, parameters) -> list:
        """The pairs kept in the parameter node (pairs whose fixed or moving volume was deleted are left out)."""
        return [ScenePair(**refs) for refs in _read_reference_list(parameters, "trainingPair", _PAIR_COUNT, _PAIR_KEYS,
                                                                   required=("fixed", "moving"))]

    def set_scene_pairs(self, parameters, pairs) -> None:
        """Keep ``pairs`` in the parameter node as node references (saved and restored with the scene)."""
        _write_reference_list(parameters, "trainingPair", _PAIR_COUNT, _PAIR_KEYS, pairs)

    def add_scene_pair(self, parameters, pair: ScenePair) -> list:
        """Check ``pair`` and append it to the parameter node's pairs; returns all pairs."""
        self.check_scene_pairs([pair])
        pairs = self.scene_pairs(parameters) + [pair]
        self.set_scene_pairs(parameters, pairs)
        return pairs

    def remove_scene_pair(self, parameters, index: int) -> list:
        """Remove pair number ``index`` (0-based) from the parameter node; returns the remaining pairs."""
        pairs = self.scene_pairs(parameters)
        if 0 <= index < len(pairs):
            del pairs[index]
            self.set_scene_pairs(parameters, pairs)
        return pairs

    @staticmethod
    def check_scene_pairs(pairs) -> None:
        """``mmreg.InputError`` naming the first unusable pair (missing or equal volumes, wrong node kinds)."""
        from mmreg import InputError
        pairs = list(pairs or [])
        if not pairs:
            raise InputError("No training pairs: add at least one pair of fixed and moving volumes.")
        for i, pair in enumerate(pairs, start=1):
            for key in ("fixed", "moving"):
                node = getattr(pair, key)
                if node is None:
                    raise InputError(f"Pair {i}: select the {key} volume.")
                if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                    raise InputError(f"Pair {i}: the {key} image '{node.GetName()}' must be a scalar volume, not a "
                                     f"{node.GetClassName()}.")
            if pair.fixed is pair.moving or pair.fixed.GetID() == pair.moving.GetID():
                raise InputError(f"Pair {i}: the fixed and moving volumes must be two different volumes.")
            for key in ("fixed_labels", "moving_labels"):
                node = getattr(pair, key)
                if node is not None and not (node.IsA("vtkMRMLSegmentationNode")
                                             or node.IsA("vtkMRMLLabelMapVolumeNode")):
                    raise InputError(f"Pair {i}: the {key.replace('_', ' ')} must be a segmentation or a labelmap "
                                     f"volume, not a {node.GetClassName()}.")
            for key in ("fixed_modality", "moving_modality"):
                if str(getattr(pair, key)).lower() not in ("auto", "mr", "ct"):
                    raise InputError(f"Pair {i}: {key.replace('_', ' ')} must be auto, MR or CT.")

    @staticmethod
    def label_image(node, volume, names: dict):
        """The labels of ``node`` (a labelmap volume, resampled nearest-neighbour onto ``volume``'s grid when its
        grid differs, values kept; or a segmentation, exported on ``volume``'s grid) as a SimpleITK image.

        Segments are numbered by name: ``names`` (lower-case name -> (value, name)) is shared by all the label
        maps of one export and grows with each new name, so the same name gets the same value everywhere.
        """
        import SimpleITK as sitk
        from mmreg_slicer import bridge
        if node.IsA("vtkMRMLLabelMapVolumeNode"):
            image = bridge.image_from_volume_node(node)
            reference = bridge.image_from_volume_node(volume)
            if (image.GetSize() != reference.GetSize()
                    or not np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
                    or not np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6)
                    or not np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)):
                image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                      image.GetPixelID())
            return image
        image, info = bridge.segmentation_to_labelmap_image(node, volume)
        mapping = {}
        for value, segment in info.items():
            key = str(segment["name"]).strip().lower()
            if key not in names:
                names[key] = (len(names) + 1, str(segment["name"]))
            mapping[int(value)] = names[key][0]
        lut = np.zeros(max(list(mapping) + [0]) + 1, dtype=np.uint16)
        for old, new in mapping.items():
            lut[old] = new
        array = lut[np.clip(sitk.GetArrayFromImage(image).astype(np.int64), 0, len(lut) - 1)]
        remapped = sitk.GetImageFromArray(array)
        remapped.CopyInformation(image)
        return remapped

    def export_scene_pairs(self, pairs, folder, manifest_name: str = "manifest.csv") -> Path:
        """Write the pairs' images (NRRD, LPS, the nodes' own coordinates: parent transforms are not
        applied) and a manifest listing them into ``folder``; returns the manifest's path.

        Label maps lie on their image's grid. Segmentations are numbered by segment name across
        all pairs (the same name gets the same value everywhere, so Dice compares like with
        like); ``labels.json`` in ``folder`` lists value -> name. Labelmap volumes keep their values.
        """
        import SimpleITK as sitk
        from mmreg.manifest import write_manifest
        from mmreg_slicer import bridge

        self.check_scene_pairs(pairs)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = {}  # lower-case segment name -> (value, name)

        def labels_file(node, volume, path):
            sitk.WriteImage(self.label_image(node, volume, names), str(path), useCompression=True)
            return str(path)

        rows = []
        for i, pair in enumerate(pairs, start=1):
            row = {"fixed_modality": pair.fixed_modality, "moving_modality": pair.moving_modality,
                   "split": pair.split}
            for side in ("fixed", "moving"):
                volume = getattr(pair, side)
                path = folder / f"pair{i:03d}_{side}.nrrd"
                sitk.WriteImage(bridge.image_from_volume_node(volume), str(path), useCompression=True)
                row[side] = str(path)
                labels = getattr(pair, f"{side}_labels")
                row[f"{side}_labels"] = (labels_file(labels, volume, folder / f"pair{i:03d}_{side}_labels.nrrd")
                                         if labels is not None else "")
            rows.append(row)
        import json
        (folder / "labels.json").write_text(json.dumps({str(v): n for v, n in sorted(names.values())}, indent=1))
        return write_manifest(folder / manifest_name, rows)

    # ------------------------------------------------------------------ runs
    @staticmethod
    def check_manifest(manifest) -> tuple:
        """``(entries, problems)`` of a manifest whose files exist; ``mmreg.InputError`` when no pair is
        usable (the message lists the first problems)."""
        from mmreg import InputError
        from mmreg.manifest import read_manifest
        path = Path(str(manifest or "")).expanduser()
        if not str(manifest or "").strip():
            raise InputError("Choose the manifest file that lists the training pairs.")
        if not path.is_file():
            raise InputError(f"Manifest '{path}' does not exist.")
        entries, problems = read_manifest(path)
        usable = []
        for entry in entries:
            missing = [f for f in entry.files() if not Path(f).is_file()]
            if missing:
                problems.append(f"row {entry.row}: file not found: {missing[0]}")
            else:
                usable.append(entry)
        if not usable:
            listed = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise InputError(f"No usable pair in the manifest '{path}'" + (f": {listed}." if listed else
                                                                            " (it lists no pairs)."))
        return usable, problems

    def check_run(self, method: str, name: str, *, output=None, resume: bool = False, **choices) -> TrainingChoices:
        """Everything about a run but its data: no other run going, a trainable method, a usable
        model name that is free (or, for ``resume``, a checkpoint to resume), usable choices and
        base model. Returns the choices; ``mmreg.InputError`` says what is wrong."""
        from mmreg import InputError
        if self.is_running:
            raise InputError(f"The training of '{self.run.name}' is still running; stop it or wait for it to end.")
        methods = self.trainable_methods()
        if method not in methods:
            raise InputError(f"Method '{method}' cannot be trained; trainable methods: {', '.join(methods)}.")
        problem = panelstate.name_problem(name)
        if problem:
            raise InputError(problem)
        picked = TrainingChoices.from_keywords(**choices)
        problems = picked.problems()
        if problems:
            raise InputError(" ".join(problems))
        out = self.output_folder(method, name, output)
        models = {m["name"]: m for m in self.list_models(method)}
        resumable = self.can_resume(method, name, output)
        if resume and not resumable:
            raise InputError(f"Nothing to resume for '{name}': no checkpoint in '{out / 'training'}'. Start a new "
                             "training instead.")
        if not resume:
            if (output is None and name in models) or (out / "model.json").is_file():
                where = models[name]["source"] if name in models else "user"
                raise InputError(f"A {where} model named '{name}' already exists for method '{method}'"
                                 f" ({models[name]['path'] if name in models else out}): choose another name, "
                                 + ("resume its run to train it further, " if resumable else "")
                                 + "or rename or delete that model first.")
            if resumable:
                raise InputError(f"An unfinished run of '{name}' exists in '{out}': resume it, or choose another "
                                 "name.")
        if picked.base_model and not Path(picked.base_model).expanduser().exists() and picked.base_model not in models:
            raise InputError(f"Base model '{picked.base_model}' is not a model of method '{method}' "
                             f"(available: {', '.join(sorted(models)) or 'none'}).")
        return picked

    def start(self, method: str, manifest, name: str, *, output=None, resume: bool = False, **choices) -> TrainingRun:
        """Start ``mmreg train`` on the pairs of ``manifest`` for a new model ``name`` of ``method``.

        ``choices``: see :class:`~RegistrationTrainingLib.runner.TrainingChoices` (base_model,
        iterations, learning_rate, batch_size, spacing, augment, smoothness, validation_fraction,
        device, threads). ``output``: the model folder (default: the user model folder, where the
        method modules find it). ``resume``: continue a stopped or interrupted run of ``name``
        (with the same data and choices; more iterations train a finished model further).
        Returns the running :class:`TrainingRun` (also kept as :attr:`run`).
        """
        picked = self.check_run(method, name, output=output, resume=resume, **choices)
        self.check_manifest(manifest)
        manifest = Path(str(manifest)).expanduser()
        out = self.output_folder(method, name, output)
        command = train_command(method, manifest, name, picked, output=output, resume=resume)
        progress_file = out / "training" / "progress.jsonl"
        offset = 0 if resume or not progress_file.is_file() else progress_file.stat().st_size
        logging.info("RegistrationTraining: %s", " ".join(command))
        self.run = TrainingRun(command, method, name, out, self.work_folder(method, name) / "console.txt",
                               env=self._environment(), resume=resume, initial_offset=offset)
        self.run.choices = picked
        return self.run

    def start_from_scene(self, method: str, pairs, name: str, *, resume: bool = False, export_folder=None,
                         **kwargs) -> TrainingRun:
        """Export the scene ``pairs`` (:class:`ScenePair`) and :meth:`start` on them. The files go to
        ``export_folder`` (default ``work_folder(method, name)/data``, replaced at each new start);
        a resume reuses the files of the run it continues when they are still there."""
        self.check_run(method, name, resume=resume, **kwargs)  # before anything is written
        folder = Path(export_folder) if export_folder else self.work_folder(method, name) / "data"
        manifest = folder / "manifest.csv"
        if not (resume and manifest.is_file()):
            self.check_scene_pairs(pairs)
            if folder.is_dir() and not export_folder:
                shutil.rmtree(folder)  # a previous export of this name: never mix old and new pairs
            manifest = self.export_scene_pairs(pairs, folder)
        return self.start(method, manifest, name, resume=resume, **kwargs)

    def resume(self, method: str, name: str, manifest=None, **kwargs) -> TrainingRun:
        """Continue the stopped or interrupted run of ``name`` from its last checkpoint. ``manifest``:
        the run's data (default: the scene pairs exported for it by :meth:`start_from_scene`)."""
        if manifest is None:
            manifest = self.work_folder(method, name) / "data" / "manifest.csv"
        return self.start(method, manifest, name, resume=True, **kwargs)

    def start_with_parameters(self, parameters, resume: bool = False) -> TrainingRun:
        """Start (or resume) from the panel's parameter node (what Start and Resume do)."""
        p = parameters
        choices = {"base_model": panelstate.base_model_value(p.baseModel, self.default_model(p.method)),
                   "iterations": p.iterations, "learning_rate": p.learningRate, "batch_size": p.batchSize,
                   "spacing": p.spacing or None, "augment": p.augment, "smoothness": p.smoothness,
                   "validation_fraction": p.validationFraction, "device": p.device or "auto",
                   "threads": p.threads or None}
        if p.dataSource == "manifest":
            return self.start(p.method, p.manifestPath, p.modelName, resume=resume, **choices)
        return self.start_from_scene(p.method, self.scene_pairs(p), p.modelName, resume=resume, **choices)

    @staticmethod
    def _environment() -> dict:
        """The training process's environment: Slicer's start-up environment (what PythonSlicer
        expects; the current one outside Slicer) with this session's ``MMREG_*`` settings and the
        engine on ``PYTHONPATH``."""
        try:
            base = slicer.util.startupEnvironment()
        except Exception:  # noqa: BLE001 - outside the Slicer application: the current environment
            base = dict(os.environ)
        base = {k: v for k, v in base.items() if not k.startswith("MMREG_")}
        base.update({k: v for k, v in os.environ.items() if k.startswith("MMREG_")})
        return child_environment(base)

    def poll(self, run: TrainingRun | None = None) -> list:
        """New events of ``run`` (default :attr:`run`), with the loss/Dice tables and plots updated."""
        run = run or self.run
        if run is None:
            return []
        events = run.poll()
        if events or not self._curves.get(str(run.output_dir)):
            self.update_curves(run)
        return events

    def stop(self, run: TrainingRun | None = None) -> None:
        """Ask the run to stop after its current step (it keeps a checkpoint: resumable)."""
        run = run or self.run
        if run is not None:
            run.stop()

    # ------------------------------------------------------------------ curves
    def curve_nodes(self, run: TrainingRun) -> dict:
        """The run's tables, plot series and charts (made on first use, remade if deleted):
        ``loss_table`` (step, loss), ``validation_table`` (step, mean Dice, mean loss),
        ``loss_chart`` (training and validation loss) and ``dice_chart`` (validation Dice)."""
        scene = slicer.mrmlScene
        ids = self._curves.get(str(run.output_dir)) or {}
        nodes = {key: scene.GetNodeByID(node_id) for key, node_id in ids.items()}
        if ids and all(node is not None for node in nodes.values()):
            return nodes
        base = f"{run.method} {run.name}"
        nodes = {"loss_table": scene.AddNewNodeByClass("vtkMRMLTableNode", f"{base} training loss"),
                 "validation_table": scene.AddNewNodeByClass("vtkMRMLTableNode", f"{base} validation")}
        slicer.util.updateTableFromArray(nodes["loss_table"], [np.zeros(0), np.zeros(0)], ["step", "loss"])
        slicer.util.updateTableFromArray(nodes["validation_table"], [np.zeros(0)] * 3,
                                         ["step", "mean Dice", "mean loss"])

        def series(key, table, column, colour, markers):
            node = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{base} {column}"
                                           + (" (validation)" if key.startswith("validation") else ""))
            node.SetAndObserveTableNodeID(nodes[table].GetID())
            node.SetXColumnName("step")
            node.SetYColumnName(column)
            node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle if markers
                                else slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            node.SetColor(*colour)
            nodes[key] = node
            return node

        def chart(key, title, y_title, members):
            node = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{base} {title}")
            node.SetTitle(f"{run.name}: {title}")
            node.SetXAxisTitle("step")
            node.SetYAxisTitle(y_title)
            for member in members:
                node.AddAndObservePlotSeriesNodeID(member.GetID())
            nodes[key] = node

        chart("loss_chart", "loss", "loss (lower is better)",
              [series("loss_series", "loss_table", "loss", (0.2, 0.4, 0.8), False),
               series("validation_loss_series", "validation_table", "mean loss", (0.9, 0.5, 0.1), True)])
        chart("dice_chart", "validation Dice", "mean Dice (higher is better)",
              [series("validation_dice_series", "validation_table", "mean Dice", (0.1, 0.6, 0.3), True)])
        self._curves[str(run.output_dir)] = {key: node.GetID() for key, node in nodes.items()}
        return nodes

    def update_curves(self, run: TrainingRun) -> dict:
        """Copy the run's losses and validation results into its tables; returns the nodes."""
        nodes = self.curve_nodes(run)
        progress = run.progress
        slicer.util.updateTableFromArray(
            nodes["loss_table"], [np.asarray(progress.loss_steps, dtype=np.float64),
                                  np.asarray(progress.losses, dtype=np.float64)], ["step", "loss"])
        rows = np.asarray([[s, math.nan if d is None else d, math.nan if lo is None else lo]
                           for s, d, lo in progress.validation], dtype=np.float64).reshape(-1, 3)
        slicer.util.updateTableFromArray(nodes["validation_table"], [rows[:, 0], rows[:, 1], rows[:, 2]],
                                         ["step", "mean Dice", "mean loss"])
        return nodes

    # ------------------------------------------------------------------ joint registration-segmentation
    @property
    def joint_running(self) -> bool:
        """True while this Logic's last joint-segmentation run has not ended (as of the last poll)."""
        return self.joint_run is not None and self.joint_run.running

    @staticmethod
    def segmenter_folder(name: str, output=None) -> Path:
        """Where the segmenter ``name`` is written: ``output/name`` when an output folder is given, else
        ``<user models>/segmenters/<name>``."""
        if output:
            return Path(output).expanduser() / name
        from mmreg.models import user_model_root
        return Path(user_model_root()) / "segmenters" / name

    def joint_annotated(self, parameters) -> list:
        """The annotated volumes kept in the parameter node (left out: entries whose volume or labels were deleted)."""
        return [AnnotatedVolume(**refs) for refs in _read_reference_list(
            parameters, "jointAnnotated", _ANNOTATED_COUNT, _ANNOTATED_KEYS, required=_ANNOTATED_KEYS)]

    def set_joint_annotated(self, parameters, annotated) -> None:
        """Keep ``annotated`` (:class:`AnnotatedVolume`) in the parameter node as node references."""
        _write_reference_list(parameters, "jointAnnotated", _ANNOTATED_COUNT, _ANNOTATED_KEYS, annotated)

    def add_joint_annotated(self, parameters, volume, labels) -> list:
        """Check an annotated volume and append it to the parameter node's list; returns the list."""
        entry = AnnotatedVolume(volume, labels)
        self.check_joint_inputs([entry], [], check_labels=False)
        entries = self.joint_annotated(parameters) + [entry]
        self.set_joint_annotated(parameters, entries)
        return entries

    def remove_joint_annotated(self, parameters, index: int) -> list:
        """Remove annotated volume number ``index`` (0-based) from the list; returns the rest."""
        entries = self.joint_annotated(parameters)
        if 0 <= index < len(entries):
            del entries[index]
            self.set_joint_annotated(parameters, entries)
        return entries

    @staticmethod
    def _annotated_entries(annotated) -> list:
        return [entry if isinstance(entry, AnnotatedVolume) else AnnotatedVolume(*entry) for entry in annotated or []]

    def check_joint_inputs(self, annotated, unannotated, check_labels: bool = True) -> list:
        """``mmreg.InputError`` naming the first unusable input; returns the annotated label images (SimpleITK,
        on their volumes' grids) and fills nothing in the scene. ``annotated``: :class:`AnnotatedVolume` or
        ``(volume, labels)``; ``check_labels``: also export the labels and refuse a label map with no label
        inside its volume (a segmentation of another image, or an empty one)."""
        from mmreg import InputError
        annotated = self._annotated_entries(annotated)
        if not annotated:
            raise InputError("No annotated volume: add at least one volume with its segmentation (or labelmap).")

        def scalar(node, what):
            if node is None:
                raise InputError(f"{what}: select the volume.")
            if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise InputError(f"{what}: '{node.GetName()}' must be a scalar volume, not a {node.GetClassName()}.")

        seen = set()
        for i, entry in enumerate(annotated, start=1):
            scalar(entry.volume, f"Annotated volume {i}")
            if entry.labels is None:
                raise InputError(f"Annotated volume {i} ('{entry.volume.GetName()}'): select its segmentation or "
                                 "labelmap.")
            if not (entry.labels.IsA("vtkMRMLSegmentationNode") or entry.labels.IsA("vtkMRMLLabelMapVolumeNode")):
                raise InputError(f"Annotated volume {i}: the labels '{entry.labels.GetName()}' must be a segmentation "
                                 f"or a labelmap volume, not a {entry.labels.GetClassName()}.")
            seen.add(entry.volume.GetID())
        for i, volume in enumerate(unannotated or [], start=1):
            scalar(volume, f"Unannotated volume {i}")
            if volume.GetID() in seen:
                raise InputError(f"'{volume.GetName()}' is both an annotated and an unannotated volume.")
        if not check_labels:
            return []
        import SimpleITK as sitk
        from mmreg import MMRegError
        names, images = {}, []
        for i, entry in enumerate(annotated, start=1):
            problem = (f"Annotated volume {i}: '{entry.labels.GetName()}' has no label inside the volume "
                       f"'{entry.volume.GetName()}' (empty, or the segmentation of another image)")
            try:
                image = self.label_image(entry.labels, entry.volume, names)
            except MMRegError as exc:  # e.g. a segmentation that does not overlap the volume at all
                raise InputError(f"{problem}: {exc}") from None
            if not np.any(sitk.GetArrayViewFromImage(image)):
                raise InputError(problem + ".")
            images.append(image)
        self._joint_names = {value: name for value, name in names.values()}
        return images

    def start_joint_segmentation(self, annotated, unannotated, name: str, *, output=None, method: str = "multiscale",
                                 model: str | None = None, steps: int = 400, spacing: float = 3.0,
                                 threads: int | None = None, test=(), options: dict | None = None
                                 ) -> JointSegmentationRun:
        """Train a segmenter on the ``annotated`` volumes (:class:`AnnotatedVolume` or ``(volume, labels)``)
        plus the ``unannotated`` volumes with the labels that ``method`` (default ``multiscale``; ``model`` its
        model) propagates to them: ``mmreg joint-seg`` in a separate process, on the nodes exported to
        temporary files (the nodes' own coordinates; segments numbered by name, as for the training pairs).

        ``steps``: segmentation training steps; ``spacing``: segmentation grid (mm); ``test``: held-out
        ``(volume, labels)`` scored at the end (``run.held_out_dice``); ``options``: registration method
        options (e.g. ``{"refinement_steps": 0}``). The segmenter goes to :meth:`segmenter_folder` (only when
        the run succeeds). Returns the running
        :class:`~RegistrationTrainingLib.jointseg.JointSegmentationRun` (also :attr:`joint_run`); bad input
        raises ``mmreg.InputError`` before anything is written or started.
        """
        import SimpleITK as sitk
        from mmreg import InputError
        from mmreg_slicer import bridge
        if self.joint_running:
            raise InputError(f"The joint segmentation '{self.joint_run.name}' is still running; stop it or wait.")
        problem = panelstate.name_problem(name)
        if problem:
            raise InputError(problem.replace("model", "segmenter"))
        if not str(method or "").strip():
            raise InputError("Choose the registration method that propagates the labels (e.g. multiscale).")
        for value, what, low in ((steps, "steps", 1), (spacing, "spacing", 1e-6)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value < low:
                raise InputError(f"The segmentation {what} must be a number >= {low:g}, got {value!r}.")
        unannotated = [v for v in (unannotated or []) if v is not None]
        if not unannotated:
            raise InputError("No unannotated volume: the labels are propagated to unannotated volumes; add one or "
                             "more.")
        annotated = self._annotated_entries(annotated)
        test = self._annotated_entries(test)
        label_images = self.check_joint_inputs(annotated + test, unannotated)
        names = dict(self._joint_names)
        out = self.segmenter_folder(name, output)
        if out.exists():
            raise InputError(f"A segmenter named '{name}' already exists ({out}): choose another name or delete it.")
        work = Path(tempfile.mkdtemp(prefix=f"mmreg-jointseg-{name}-"))
        data = work / "data"
        data.mkdir()
        files = []
        for i, (entry, labels) in enumerate(zip(annotated + test, label_images), start=1):
            image_path, labels_path = data / f"annotated{i:03d}.nrrd", data / f"annotated{i:03d}_labels.nrrd"
            sitk.WriteImage(bridge.image_from_volume_node(entry.volume), str(image_path), useCompression=True)
            sitk.WriteImage(labels, str(labels_path), useCompression=True)
            files.append((str(image_path), str(labels_path)))
        unannotated_files = []
        for i, volume in enumerate(unannotated, start=1):
            path = data / f"unannotated{i:03d}.nrrd"
            sitk.WriteImage(bridge.image_from_volume_node(volume), str(path), useCompression=True)
            unannotated_files.append(str(path))
        label_ids = sorted(names) if names else "all"  # segmentations: every named segment; labelmaps: their ids
        out.parent.mkdir(parents=True, exist_ok=True)

        def command_for(partial, progress_file, stop_file):
            return joint_seg_command(files[:len(annotated)], unannotated_files, partial, method=method,
                                     model=model or None,
                                     steps=int(steps), spacing=float(spacing), labels=label_ids, threads=threads,
                                     test=files[len(annotated):], options=options, progress_file=progress_file,
                                     stop_file=stop_file)

        self.joint_run = JointSegmentationRun(command_for, name, out, work, segment_names=names,
                                              env=self._environment())
        logging.info("RegistrationTraining: %s", " ".join(self.joint_run.command))
        return self.joint_run

    def start_joint_with_parameters(self, parameters) -> JointSegmentationRun:
        """Start the joint segmentation from the panel's parameter node (what its Start button does)."""
        p = parameters
        return self.start_joint_segmentation(
            self.joint_annotated(p), [v for v in p.jointUnannotatedVolumes if v is not None], p.jointSegmenterName,
            output=p.jointOutputFolder or None, method=p.jointMethod, model=p.jointModel or None, steps=p.jointSteps,
            spacing=p.jointSpacing, threads=p.threads or None)

    def poll_joint(self, run: JointSegmentationRun | None = None) -> list:
        """New progress reports of the joint-segmentation run (default :attr:`joint_run`)."""
        run = run or self.joint_run
        return run.poll() if run is not None else []

    def stop_joint(self, run: JointSegmentationRun | None = None) -> None:
        """Ask the joint-segmentation run to stop at its next progress report (nothing is written)."""
        run = run or self.joint_run
        if run is not None:
            run.stop()

    def segment_volume(self, volume, segmenter, name: str | None = None):
        """Segment ``volume`` with a segmenter of :meth:`start_joint_segmentation` (its folder, or its name in
        the user segmenters); returns a NEW segmentation node named ``"<volume> segmentation"`` (or ``name``)
        with one segment per label id, named as the segments it was trained on (``"Label <id>"`` when the names
        are unknown). Runs in this process: one volume takes seconds. ``volume`` is not modified."""
        import json
        from mmreg import InputError
        from mmreg.segmentation import load_segmenter, segment
        from mmreg_slicer import bridge
        if volume is None:
            raise InputError("Choose the volume to segment.")
        if not volume.IsA("vtkMRMLScalarVolumeNode") or volume.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(f"'{volume.GetName()}' must be a scalar volume, not a {volume.GetClassName()}.")
        if not str(segmenter or "").strip():
            raise InputError("Choose the segmenter (a folder written by the joint segmentation, or its name).")
        folder = Path(str(segmenter)).expanduser()
        if not folder.is_dir():
            if panelstate.name_problem(str(segmenter)) is None and self.segmenter_folder(str(segmenter)).is_dir():
                folder = self.segmenter_folder(str(segmenter))
            else:
                raise InputError(f"Segmenter '{segmenter}' is neither a folder nor the name of a trained segmenter.")
        network, card = load_segmenter(folder)
        try:
            names = {int(k): v for k, v in json.loads((folder / SEGMENT_NAMES).read_text()).items()}
        except (OSError, ValueError):
            names = {}
        labels = segment(network, bridge.image_from_volume_node(volume), card["label_ids"], card["spacing_mm"],
                         card.get("architecture"))
        info = {int(v): {"name": names.get(int(v), f"Label {int(v)}"), "color": bridge._default_color(int(v))}
                for v in card["label_ids"]}
        return bridge.segmentation_node_from_labelmap_image(labels, slicer.mrmlScene,
                                                            name or f"{volume.GetName()} segmentation", info)

    # ------------------------------------------------------------------ models
    def rename_model(self, method: str, name: str, new_name: str) -> None:
        """Rename the user model ``name`` of ``method`` (its exported training data follows)."""
        from mmreg import InputError
        from mmreg.models import rename_model
        problem = panelstate.name_problem(new_name)
        if problem:
            raise InputError(problem)
        if self.is_running and self.run.name == name:
            raise InputError(f"'{name}' is being trained; stop the training first.")
        rename_model(method, name, new_name)
        old, new = self.work_folder(method, name), self.work_folder(method, new_name)
        if old.is_dir() and not new.exists():
            old.rename(new)

    def delete_model(self, method: str, name: str) -> None:
        """Delete the user model ``name`` of ``method`` and its exported training data (shipped models cannot be deleted)."""
        from mmreg import InputError
        from mmreg.models import delete_model
        if self.is_running and self.run.name == name:
            raise InputError(f"'{name}' is being trained; stop the training first.")
        delete_model(method, name)
        shutil.rmtree(self.work_folder(method, name), ignore_errors=True)


# ============================================================================ widget
class RegistrationTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel (Resources/UI/RegistrationTraining.ui): data, model, options, run controls, trained models.

    Training runs in a separate process; a timer polls its progress (once a second) so the GUI
    never waits for it. Every decision shown (Start/Resume enabled and why, the lists) comes
    from :mod:`RegistrationTrainingLib.panelstate` and the Logic.
    """

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._combos = None
        self._engine_missing = False
        self._methods = []
        self._timer = None
        self._jointTimer = None
        self._nodeLists = None

    def setup(self):
        """Load the .ui file, connect the controls, fill the run-time lists."""
        import qt
        from MMRegCommonLib.combos import NodeListCombos, ParameterCombos
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RegistrationTrainingLogic()
        self._combos = ParameterCombos(self.ui.__dict__.values(), on_change=self._onComboChanged)
        self._nodeLists = NodeListCombos(self.ui.__dict__.values(), on_change=lambda name: self._updateJointButtons())

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        for button, slot in ((self.ui.addPairButton, self.onAddPair), (self.ui.removePairButton, self.onRemovePair),
                             (self.ui.savePairsButton, self.onSavePairs),
                             (self.ui.manifestBrowseButton, self.onBrowseManifest),
                             (self.ui.startButton, self.onStart), (self.ui.stopButton, self.onStop),
                             (self.ui.resumeButton, self.onResume), (self.ui.showLossButton, self.onShowLoss),
                             (self.ui.showDiceButton, self.onShowDice), (self.ui.renameButton, self.onRename),
                             (self.ui.deleteButton, self.onDelete),
                             (self.ui.jointAddAnnotatedButton, self.onJointAddAnnotated),
                             (self.ui.jointRemoveAnnotatedButton, self.onJointRemoveAnnotated),
                             (self.ui.jointStartButton, self.onJointStart), (self.ui.jointStopButton, self.onJointStop),
                             (self.ui.segmentButton, self.onSegment)):
            button.connect("clicked(bool)", lambda checked=False, s=slot: s())
        self.ui.pairsTableWidget.setColumnCount(4)
        self.ui.pairsTableWidget.setHorizontalHeaderLabels(["Fixed", "Moving", "Fixed labels", "Moving labels"])
        self.ui.pairsTableWidget.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.progressBar.value = 0
        self._timer = qt.QTimer()
        self._timer.setInterval(1000)
        self._timer.connect("timeout()", self._onTimer)
        self.ui.jointAnnotatedTableWidget.setColumnCount(2)
        self.ui.jointAnnotatedTableWidget.setHorizontalHeaderLabels(["Annotated volume", "Labels"])
        self.ui.jointAnnotatedTableWidget.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.jointProgressBar.value = 0
        self._jointTimer = qt.QTimer()
        self._jointTimer.setInterval(500)
        self._jointTimer.connect("timeout()", self._onJointTimer)
        self.refreshChoices()
        self.initializeParameterNode()

    # ------------------------------------------------------------------ module life
    def cleanup(self):
        """Slicer closes: ask a running training to stop (it keeps a checkpoint; Resume continues it later)."""
        for timer in (self._timer, self._jointTimer):
            if timer is not None:
                timer.stop()
        if self.logic is not None and self.logic.is_running:
            self.logic.stop()
        if self.logic is not None and self.logic.joint_running:
            self.logic.stop_joint()  # it writes nothing: a half-trained segmenter is never left behind
        self.removeObservers()

    def enter(self):
        """The module is shown: bind the parameter node and list the models again."""
        self.initializeParameterNode()
        self.refreshChoices()

    def exit(self):
        """Another module is shown: stop updating the GUI from the node (a training goes on)."""
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        """The scene is about to close: forget its parameter node."""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        """The scene closed: a fresh parameter node when the module is shown."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        """Use the module's parameter node."""
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode):
        """Bind the GUI to ``parameterNode`` or unbind (None)."""
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self._onParameterNodeModified)
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
            self.addObserver(parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._combos.set_parameter_node(parameterNode)
        self._nodeLists.set_parameter_node(parameterNode)
        if parameterNode is not None:
            self._refreshModels()
            self._onParameterNodeModified()

    # ------------------------------------------------------------------ lists and state
    def refreshChoices(self):
        """Ask the engine for the trainable methods, devices and models, and refill the lists."""
        from MMRegCommonLib import panel
        try:
            self._methods, self._engine_missing = self.logic.trainable_methods(), False
        except ImportError as exc:
            self._methods, self._engine_missing = [], True
            self.ui.methodInfoLabel.text = (f"The engine cannot be loaded ({exc}); Start installs the missing "
                                            "Python packages first.")
        self._combos.fill("method", panelstate.method_items(self._methods))
        self._combos.fill("dataSource", list(panelstate.DATA_SOURCES))
        self._combos.fill("device", [(value, label, "") for value, label in panel.device_choices()])
        self._refreshModels()

    def _refreshModels(self):
        p = self._parameterNode
        self.ui.pairsHintLabel.text = panelstate.pairs_hint(p.method if p is not None else "")
        if p is None or self._engine_missing or p.method not in self._methods:
            self._combos.fill("baseModel", [(panelstate.FROM_SCRATCH, "None: train from scratch", "")])
            self.ui.userModelComboBox.clear()
            return
        import mmreg
        models = self.logic.list_models(p.method)
        self._combos.fill("baseModel", panelstate.base_model_items(models, self.logic.default_model(p.method)))
        self.ui.methodInfoLabel.text = mmreg.get_method(p.method).description
        combo = self.ui.userModelComboBox
        current = combo.currentText
        combo.clear()
        for m in models:
            if m["source"] == "user":
                combo.addItem(m["name"])
        index = combo.findText(current)
        combo.currentIndex = index if index >= 0 else 0
        users = combo.count > 0
        for widget in (self.ui.renameButton, self.ui.deleteButton, self.ui.newNameLineEdit):
            widget.enabled = users
        self.ui.modelsInfoLabel.text = (
            f"{combo.count} fine-tuned model(s) of '{p.method}' in {self.logic.output_folder(p.method, '').parent}"
            if users else f"No fine-tuned model of '{p.method}' yet.")

    def _onComboChanged(self, name):
        if name == "method":
            self._refreshModels()

    def _onParameterNodeModified(self, caller=None, event=None):
        self._combos.update()
        self._nodeLists.update()
        self._updatePairsTable()
        self._updateButtons()
        self._updateJointTable()
        self._updateJointButtons()

    def _updatePairsTable(self):
        import qt
        p = self._parameterNode
        pairs = self.logic.scene_pairs(p) if p is not None else []
        table = self.ui.pairsTableWidget
        table.setRowCount(len(pairs))
        for row, pair in enumerate(pairs):
            for column, key in enumerate(_PAIR_KEYS):
                node = getattr(pair, key)
                table.setItem(row, column, qt.QTableWidgetItem(node.GetName() if node is not None else "-"))
        self.ui.pairsCountLabel.text = f"{len(pairs)} pair(s)"

    def _updateButtons(self):
        p = self._parameterNode
        if p is None:
            return
        scene = p.dataSource != "manifest"
        for widget in (self.ui.pairEditorWidget, self.ui.pairsTableWidget, self.ui.pairButtonsWidget):
            widget.visible = scene
        for widget in (self.ui.manifestLabel, self.ui.manifestWidget):
            widget.visible = not scene
        running = self.logic.is_running
        try:
            known = not self._engine_missing and p.method in self._methods
            existing = [m["name"] for m in self.logic.list_models(p.method)] if known else []
            resumable = known and self.logic.can_resume(p.method, p.modelName)
            if known and not panelstate.name_problem(p.modelName):
                self.ui.outputInfoLabel.text = f"Saved to {self.logic.output_folder(p.method, p.modelName)}"
        except Exception as exc:  # noqa: BLE001 - the panel must stay usable; the reason is shown
            existing, resumable = [], False
            self.ui.outputInfoLabel.text = str(exc)
        enabled, reason = panelstate.start_state(
            engine_missing=self._engine_missing, methods=self._methods, method=p.method, source=p.dataSource,
            manifest_path=p.manifestPath, pair_count=len(self.logic.scene_pairs(p)), name=p.modelName,
            existing_names=existing, resumable=resumable, running=running)
        self.ui.startButton.enabled, self.ui.startButton.toolTip = enabled, reason
        enabled, resume_reason = panelstate.resume_state(resumable=resumable, running=running, name=p.modelName)
        self.ui.resumeButton.enabled, self.ui.resumeButton.toolTip = enabled, resume_reason
        self.ui.stopButton.enabled = running
        self.ui.showLossButton.enabled = self.ui.showDiceButton.enabled = self.logic.run is not None
        for name in ("dataCollapsibleButton", "modelCollapsibleButton", "optionsCollapsibleButton"):
            getattr(self.ui, name).enabled = not running
        if not running:
            self.ui.statusLabel.text = resume_reason if resumable else reason

    # ------------------------------------------------------------------ data
    def onAddPair(self):
        """Add the pair chosen in the four selectors."""
        pair = ScenePair(self.ui.pairFixedSelector.currentNode(), self.ui.pairMovingSelector.currentNode(),
                         self.ui.pairFixedLabelsSelector.currentNode(), self.ui.pairMovingLabelsSelector.currentNode())
        self._guarded(lambda: self.logic.add_scene_pair(self._parameterNode, pair))

    def onRemovePair(self):
        """Remove the selected pairs from the list (the nodes stay in the scene)."""
        rows = sorted({index.row() for index in self.ui.pairsTableWidget.selectedIndexes()}, reverse=True)
        for row in rows:
            self.logic.remove_scene_pair(self._parameterNode, row)

    def onSavePairs(self):
        """Export the pairs and their manifest to a folder (for ``mmreg train`` in a shell or another computer)."""
        import qt
        folder = qt.QFileDialog.getExistingDirectory(None, "Folder for the pairs and their manifest")
        if folder:
            path = self._guarded(lambda: self.logic.export_scene_pairs(self.logic.scene_pairs(self._parameterNode),
                                                                         folder))
            if path:
                self._log(f"Pairs and manifest written: {path}")

    def onBrowseManifest(self):
        """Choose the manifest file."""
        import qt
        path = qt.QFileDialog.getOpenFileName(None, "Training manifest", self._parameterNode.manifestPath,
                                              "Manifests (*.csv *.json);;All files (*)")
        if path:
            self._parameterNode.manifestPath = path

    # ------------------------------------------------------------------ runs
    def _log(self, text):
        self.ui.statusLog.appendPlainText(text)
        logging.info("RegistrationTraining: %s", text)

    def _guarded(self, action):
        """Run ``action``; show a readable message for an error (the traceback too for a bug)."""
        import mmreg
        from MMRegCommonLib import panel
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - shown to the user
            text = panel.user_message(exc)
            self._log("Error: " + text)
            extra = {} if isinstance(exc, mmreg.MMRegError) else {"detailedText": traceback.format_exc()}
            slicer.util.errorDisplay(text, **extra)
            return None

    def _launch(self, resume):
        from MMRegCommonLib.dependencies import ensure_dependencies
        ok, message = ensure_dependencies()
        if not ok:
            self._log(message)
            slicer.util.warningDisplay(message)
            return
        if self._engine_missing:
            self.refreshChoices()
            if self._engine_missing:
                return
        p = self._parameterNode
        run = self._guarded(lambda: self.logic.start_with_parameters(p, resume=resume))
        if run is None:
            return
        self._log(f"--- {'Resuming' if resume else 'Training'} '{p.method}' model '{p.modelName}' "
                  f"(output {run.output_dir})")
        self.ui.progressBar.value = 0
        self._timer.start()
        self._onTimer()
        self.onShowLoss()

    def onStart(self):
        """Start a new training (exports the scene pairs first)."""
        self._launch(resume=False)

    def onResume(self):
        """Continue the stopped or interrupted run from its last checkpoint."""
        self._launch(resume=True)

    def onStop(self):
        """Ask the training to stop after the current step; it keeps a checkpoint."""
        self.logic.stop()
        self._log("Stopping after the current step (a checkpoint is kept; Resume continues)...")

    def _onTimer(self):
        run = self.logic.run
        if run is None:
            self._timer.stop()
            return
        try:
            events = self.logic.poll(run)
        except Exception as exc:  # noqa: BLE001 - keep polling problems visible but the GUI alive
            self._log(f"Could not read the training progress: {exc}")
            events = []
        for event in events:
            kind = event.get("event")
            if kind == "start":
                pairs = event.get("pairs") or {}
                self._log(f"Started at step {event.get('start_step', 0)} of {event.get('steps')}: "
                          f"{pairs.get('training', '?')} training / {pairs.get('validation', '?')} validation pairs.")
                for skipped in event.get("skipped") or []:
                    self._log(f"  skipped {skipped.get('entry')}: {skipped.get('reason')}")
            elif kind == "validation":
                dice = event.get("mean_dice")
                self._log(f"Validation at step {event.get('step')}: mean Dice "
                          f"{'n/a (no labels)' if dice is None else format(dice, '.3f')}, best step "
                          f"{event.get('best_step')}.")
        progress = run.progress
        self.ui.progressBar.value = int(round(100 * progress.fraction))
        self.ui.statusLabel.text = progress.status_text()
        if run.running:
            self._updateButtons()
            self.ui.statusLabel.text = progress.status_text()
            return
        self._timer.stop()
        if run.returncode == EXIT_DONE:
            self._log(f"Done: model '{run.name}' saved in {progress.model_dir or run.output_dir}; the "
                      f"'{run.method}' module lists it in its model selector.")
        elif run.returncode == EXIT_STOPPED:
            self._log(f"Stopped at step {progress.step}; Resume continues from the checkpoint.")
        else:
            message = run.error_message()
            self._log("Error: " + message)
            slicer.util.errorDisplay(f"Training '{run.name}' failed: {message}",
                                     detailedText=run.console_text())
        self._refreshModels()
        self._updateButtons()
        self.ui.statusLabel.text = progress.status_text() if run.returncode != EXIT_DONE else (
            progress.status_text() + f" · model '{run.name}' ready")

    def _showChart(self, key):
        run = self.logic.run
        if run is None:
            return
        chart = self.logic.curve_nodes(run)[key]
        slicer.modules.plots.logic().ShowChartInLayout(chart)

    def onShowLoss(self):
        """Show the loss curve (training and validation loss) in the view layout."""
        self._showChart("loss_chart")

    def onShowDice(self):
        """Show the validation Dice curve in the view layout."""
        self._showChart("dice_chart")

    # ------------------------------------------------------------------ joint registration-segmentation
    def _updateJointTable(self):
        import qt
        p = self._parameterNode
        entries = self.logic.joint_annotated(p) if p is not None else []
        table = self.ui.jointAnnotatedTableWidget
        table.setRowCount(len(entries))
        for row, entry in enumerate(entries):
            table.setItem(row, 0, qt.QTableWidgetItem(entry.volume.GetName()))
            table.setItem(row, 1, qt.QTableWidgetItem(entry.labels.GetName()))

    def _updateJointButtons(self):
        p = self._parameterNode
        if p is None:
            return
        running = self.logic.joint_running
        annotated = len(self.logic.joint_annotated(p))
        unannotated = len([v for v in p.jointUnannotatedVolumes if v is not None])
        if running:
            enabled, reason = False, "A joint segmentation runs; Stop ends it (nothing is written)."
        elif not annotated:
            enabled, reason = False, "Add at least one annotated volume with its segmentation or labelmap."
        elif not unannotated:
            enabled, reason = False, "Check at least one unannotated volume (it receives propagated labels)."
        else:
            problem = panelstate.name_problem(p.jointSegmenterName)
            try:
                folder = self.logic.segmenter_folder(p.jointSegmenterName, p.jointOutputFolder or None)
                where = f"; the segmenter goes to {folder}"
            except Exception:  # noqa: BLE001 - engine not loaded yet: Start installs it
                where = ""
            enabled, reason = (False, problem) if problem else (
                True, f"Ready: {annotated} annotated and {unannotated} unannotated volume(s){where}.")
        self.ui.jointStartButton.enabled, self.ui.jointStartButton.toolTip = enabled, reason
        self.ui.jointStopButton.enabled = running
        self.ui.segmentButton.enabled = not running and p.segmentVolume is not None
        if not running and (self.logic.joint_run is None or self.logic.joint_run.state == "running"):
            self.ui.jointStatusLabel.text = reason

    def onJointAddAnnotated(self):
        """Add the volume and labels chosen in the two selectors to the annotated volumes."""
        self._guarded(lambda: self.logic.add_joint_annotated(
            self._parameterNode, self.ui.jointAnnotatedVolumeSelector.currentNode(),
            self.ui.jointAnnotatedLabelsSelector.currentNode()))

    def onJointRemoveAnnotated(self):
        """Remove the selected annotated volumes from the list (the nodes stay in the scene)."""
        rows = sorted({index.row() for index in self.ui.jointAnnotatedTableWidget.selectedIndexes()}, reverse=True)
        for row in rows:
            self.logic.remove_joint_annotated(self._parameterNode, row)

    def onJointStart(self):
        """Export the volumes and labels and start ``mmreg joint-seg`` in a separate process."""
        from MMRegCommonLib.dependencies import ensure_dependencies
        ok, message = ensure_dependencies()
        if not ok:
            self._log(message)
            slicer.util.warningDisplay(message)
            return
        run = self._guarded(lambda: self.logic.start_joint_with_parameters(self._parameterNode))
        if run is None:
            return
        self._log(f"--- Joint registration-segmentation '{run.name}' (propagation: {self._parameterNode.jointMethod}; "
                  f"segmenter to {run.output})")
        self.ui.jointProgressBar.value = 0
        self._jointTimer.start()
        self._onJointTimer()

    def onJointStop(self):
        """Stop the joint segmentation at its next step; nothing is written."""
        self.logic.stop_joint()
        self._log("Stopping the joint segmentation (no segmenter is written)...")

    def _onJointTimer(self):
        run = self.logic.joint_run
        if run is None:
            self._jointTimer.stop()
            return
        try:
            self.logic.poll_joint(run)
        except Exception as exc:  # noqa: BLE001 - keep the GUI alive
            self._log(f"Could not read the joint segmentation's progress: {exc}")
        self.ui.jointProgressBar.value = int(round(100 * run.fraction))
        self.ui.jointStatusLabel.text = run.status_text()
        if run.running:
            self._updateJointButtons()
            return
        self._jointTimer.stop()
        if run.state == "done":
            self._log(run.status_text() + f"; segment a volume with it below (segmenter '{run.name}').")
            if self._parameterNode is not None and not self._parameterNode.segmenterPath:
                self._parameterNode.segmenterPath = str(run.output)
        elif run.state == "stopped":
            self._log("Joint segmentation stopped; nothing was written.")
        else:
            self._log("Error: " + run.message)
            slicer.util.errorDisplay(f"Joint segmentation '{run.name}' failed: {run.message}",
                                     detailedText=run.console_text())
        self._updateJointButtons()
        self.ui.jointStatusLabel.text = run.status_text()

    def onSegment(self):
        """Segment the chosen volume with the segmenter into a new segmentation node."""
        import qt
        p = self._parameterNode
        segmenter = p.segmenterPath.strip()
        if not segmenter:  # the segmenter named in the section above, where Start writes it
            segmenter = self._guarded(lambda: str(self.logic.segmenter_folder(p.jointSegmenterName,
                                                                              p.jointOutputFolder or None)))
            if segmenter is None:
                return
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)  # seconds: one volume, in this process
        try:
            node = self._guarded(lambda: self.logic.segment_volume(p.segmentVolume, segmenter))
        finally:
            qt.QApplication.restoreOverrideCursor()
        if node is not None:
            self._log(f"Segmented '{p.segmentVolume.GetName()}' with '{segmenter}': new segmentation "
                      f"'{node.GetName()}' "
                      f"({node.GetSegmentation().GetNumberOfSegments()} segments).")

    # ------------------------------------------------------------------ trained models
    def onRename(self):
        """Rename the chosen fine-tuned model."""
        p = self._parameterNode
        old, new = self.ui.userModelComboBox.currentText, self.ui.newNameLineEdit.text.strip()
        if self._guarded(lambda: self.logic.rename_model(p.method, old, new) or True):
            self._log(f"Model '{old}' renamed to '{new}'.")
            self.ui.newNameLineEdit.text = ""
        self._refreshModels()
        self._updateButtons()

    def onDelete(self):
        """Delete the chosen fine-tuned model (after asking)."""
        p = self._parameterNode
        name = self.ui.userModelComboBox.currentText
        if not name or not slicer.util.confirmOkCancelDisplay(
                f"Delete the fine-tuned model '{name}' of '{p.method}' and its exported training data?"):
            return
        if self._guarded(lambda: self.logic.delete_model(p.method, name) or True):
            self._log(f"Model '{name}' deleted.")
        self._refreshModels()
        self._updateButtons()


# ============================================================================ self-test
class RegistrationTrainingTest(ScriptedLoadableModuleTest):
    """Self-test: bad input gives readable errors; a tiny real training from scene pairs is stopped,
    resumed and finished, and its model registers a pair through MIRegistration's Logic.

    Runs in Slicer's Self Tests and headless under pytest. The user model folder and the engine's
    cache are temporary folders for the test (``MMREG_MODELS``, ``MMREG_CACHE``): nothing is written
    into the user's own model folder. The training is tiny (3 phantom pairs of 32^3 voxels of 4 mm,
    :attr:`steps` steps of about 0.8 s, one CPU thread): about 30 s on a laptop CPU, most of it
    starting the training process twice.
    """

    #: Steps of the test training; it is stopped after its first step and resumed to the end.
    steps = 6
    method = "mi"

    def setUp(self):
        """An empty scene, and temporary model and cache folders."""
        slicer.mrmlScene.Clear(0)
        slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(slicer.mrmlScene)
        if getattr(self, "_saved_environment", None) is None:
            self._saved_environment = {k: os.environ.get(k) for k in ("MMREG_MODELS", "MMREG_CACHE")}
            self._folder = tempfile.mkdtemp(prefix="mmreg-training-test-")
            os.environ["MMREG_MODELS"] = os.path.join(self._folder, "models")
            os.environ["MMREG_CACHE"] = os.path.join(self._folder, "cache")

    def tearDown(self):
        """Restore the environment and remove the temporary folders."""
        saved = getattr(self, "_saved_environment", None)
        if saved is None:
            return
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(self._folder, ignore_errors=True)
        self._saved_environment = None

    def runTest(self):
        """Run every check, each on a fresh scene and fresh folders."""
        for check in (self.test_BadInput, self.test_PairsRoundTrip, self.test_TrainStopResumeAndRegister):
            self.setUp()
            try:
                check()
            finally:
                self.tearDown()

    def make_pairs(self, count: int = 3) -> list:
        """``count`` phantom pairs (moving = fixed shifted by a few mm) with segmentations."""
        from MMRegCommonLib.testing import make_phantom_nodes
        shifts = [(6.0, -4.0, 5.0), (-5.0, 3.0, -4.0), (4.0, 5.0, -3.0), (-3.0, -5.0, 4.0)]
        pairs = []
        for i in range(count):
            fixed, fixed_seg, _ = make_phantom_nodes(slicer.mrmlScene, f"Fixed {i + 1}",
                                                     shift=(0.5 * i, -0.5 * i, 0.0))
            moving, moving_seg, _ = make_phantom_nodes(slicer.mrmlScene, f"Moving {i + 1}", shift=shifts[i % 4],
                                                       origin=(-60.0, -64.0, -61.0))
            pairs.append(ScenePair(fixed, moving, fixed_seg, moving_seg))
        return pairs

    def tiny_choices(self) -> dict:
        """Choices of a tiny CPU run (seconds)."""
        return {"iterations": self.steps, "spacing": 4.0, "batch_size": 1, "threads": 1, "device": "cpu",
                "validation_fraction": 0.34, "base_model": None, "learning_rate": 1e-3}

    def test_BadInput(self):
        """Readable errors before any process starts."""
        import mmreg
        logic = RegistrationTrainingLogic()
        pairs = self.make_pairs(1)
        with self.assertRaisesRegex(mmreg.InputError, "No training pairs"):
            logic.start_from_scene(self.method, [], "empty")
        with self.assertRaisesRegex(mmreg.InputError, "two different volumes"):
            logic.check_scene_pairs([ScenePair(pairs[0].fixed, pairs[0].fixed)])
        with self.assertRaisesRegex(mmreg.InputError, "must be a segmentation or a labelmap"):
            logic.check_scene_pairs([ScenePair(pairs[0].fixed, pairs[0].moving, pairs[0].moving)])
        with self.assertRaisesRegex(mmreg.InputError, "cannot be trained"):
            logic.start_from_scene("optimize", pairs, "x")
        with self.assertRaisesRegex(mmreg.InputError, "not usable as a folder name"):
            logic.start_from_scene(self.method, pairs, "../escape")
        with self.assertRaisesRegex(mmreg.InputError, "does not exist"):
            logic.start(self.method, os.path.join(self._folder, "missing.csv"), "x")
        manifest = Path(self._folder) / "broken.csv"
        manifest.write_text("fixed,moving\nnot_there.nii.gz,also_not_there.nii.gz\n")
        with self.assertRaisesRegex(mmreg.InputError, "file not found"):
            logic.start(self.method, manifest, "x")
        with self.assertRaisesRegex(mmreg.InputError, "Nothing to resume"):
            logic.start_from_scene(self.method, pairs, "never_started", resume=True)
        with self.assertRaisesRegex(mmreg.InputError, "Unknown training choice"):
            logic.start_from_scene(self.method, pairs, "x", epochs=3)
        with self.assertRaisesRegex(mmreg.InputError, "iterations must be"):
            logic.start_from_scene(self.method, pairs, "x", iterations=0)
        self.assertIsNone(logic.run)
        self.delayDisplay("Bad input gives readable errors")

    def test_PairsRoundTrip(self):
        """Scene pairs are kept in the parameter node, saved with the scene and exported to files."""
        import SimpleITK as sitk
        from mmreg.manifest import read_manifest
        logic = RegistrationTrainingLogic()
        pairs = self.make_pairs(2)
        params = logic.getParameterNode()
        logic.add_scene_pair(params, pairs[0])
        logic.add_scene_pair(params, ScenePair(pairs[1].fixed, pairs[1].moving))
        self.assertEqual([p.fixed.GetName() for p in logic.scene_pairs(params)], ["Fixed 1", "Fixed 2"])
        self.assertIsNone(logic.scene_pairs(params)[1].moving_labels)

        from MMRegCommonLib.testing import reload_module_node
        reloaded, node = reload_module_node(slicer.mrmlScene, "RegistrationTraining")
        restored = logic.scene_pairs(node)
        self.assertEqual([(p.fixed.GetName(), p.moving.GetName()) for p in restored],
                         [("Fixed 1", "Moving 1"), ("Fixed 2", "Moving 2")])
        self.assertEqual(restored[0].moving_labels.GetName(), "Moving 1 segments")

        manifest = logic.export_scene_pairs(logic.scene_pairs(params), Path(self._folder) / "export")
        entries, problems = read_manifest(manifest)
        self.assertEqual((len(entries), problems), (2, []))
        fixed = sitk.ReadImage(entries[0].fixed)
        labels = sitk.ReadImage(entries[0].fixed_labels)
        self.assertEqual(fixed.GetSize(), (32, 32, 32))
        self.assertEqual(labels.GetSize(), fixed.GetSize())
        np.testing.assert_allclose(labels.GetOrigin(), fixed.GetOrigin(), atol=1e-3)
        self.assertEqual(set(np.unique(sitk.GetArrayFromImage(labels))), {0, 1, 2})
        self.assertIsNone(entries[1].fixed_labels)
        logic.remove_scene_pair(params, 0)
        self.assertEqual([p.fixed.GetName() for p in logic.scene_pairs(params)], ["Fixed 2"])
        self.delayDisplay("Scene pairs: parameter node, scene file and export")

    def test_TrainStopResumeAndRegister(self):
        """A tiny real run: stopped after its first step, resumed to the end; the model is listed and registers."""
        import mmreg
        import SimpleITK as sitk
        from mmreg_slicer import bridge
        from MMRegCommonLib.testing import F
        logic = RegistrationTrainingLogic()
        pairs = self.make_pairs(3)
        name = "selftest_model"
        run = logic.start_from_scene(self.method, pairs, name, **self.tiny_choices())
        seen = []

        def stop_after_first_step(events):
            seen.extend(events)
            if any(e.get("event") == "step" for e in events):
                run.stop()

        self.assertEqual(run.wait(timeout=300, interval=0.05, on_events=stop_after_first_step), 130,
                         run.console_text())
        kinds = [e["event"] for e in seen]
        self.assertEqual(kinds[0], "start")
        self.assertEqual(seen[0]["pairs"], {"training": 2, "validation": 1})
        self.assertEqual(kinds[-1], "stopped")
        stopped_at = seen[-1]["step"]
        self.assertTrue(1 <= stopped_at < self.steps, f"stopped at step {stopped_at} of {self.steps}")
        self.assertTrue(logic.can_resume(self.method, name))
        # A stopped run leaves the model so far, usable at once; a new start under its name is refused.
        self.assertIn(name, [m["name"] for m in logic.list_models(self.method)])
        with self.assertRaisesRegex(mmreg.InputError, "already exists .* resume its run"):
            logic.start_from_scene(self.method, pairs, name, **self.tiny_choices())

        run = logic.resume(self.method, name, **self.tiny_choices())
        self.assertEqual(run.wait(timeout=300, interval=0.1), 0, run.console_text())
        logic.poll(run)
        progress = run.progress
        self.assertEqual(progress.state, "done")
        self.assertEqual(progress.step, self.steps)
        self.assertEqual(progress.start_step, stopped_at)
        self.assertEqual(progress.loss_steps, list(range(1, self.steps + 1)))
        self.assertTrue(all(math.isfinite(v) for v in progress.losses), progress.losses)
        dice = [d for _, d, _ in progress.validation if d is not None]
        self.assertTrue(dice and all(0.0 <= d <= 1.0 for d in dice), progress.validation)
        nodes = logic.curve_nodes(run)
        self.assertEqual(nodes["loss_table"].GetNumberOfRows(), self.steps)
        self.assertEqual(nodes["validation_table"].GetNumberOfRows(), len(progress.validation))
        self.assertEqual(nodes["loss_chart"].GetNumberOfPlotSeriesNodes(), 2)

        listed = {m["name"]: m for m in logic.list_models(self.method)}
        self.assertEqual(listed[name]["source"], "user")
        self.assertEqual(listed[name]["spacing_mm"], 4.0)
        with self.assertRaisesRegex(mmreg.InputError, "already exists"):
            logic.start_from_scene(self.method, pairs, name, **self.tiny_choices())

        # The new model in the method module: listed there, and it registers a pair.
        from MIRegistration import MIRegistrationLogic
        registration = MIRegistrationLogic()
        self.assertIn(name, [m.value for m in registration.method_status().models])
        outcome = registration.run(pairs[0].fixed, pairs[0].moving, method=self.method, model=name, affine=False,
                                   device="cpu", refinement_steps=0)
        self.assertTrue(outcome.transform_node.IsA("vtkMRMLGridTransformNode"))
        displacement = sitk.GetArrayFromImage(bridge.displacement_from_grid_transform_node(outcome.transform_node))
        self.assertTrue(np.all(np.isfinite(displacement)))
        point = np.array([2.0, -3.0, 4.0])
        moved = np.array(outcome.transform_node.GetTransformFromParent().TransformPoint(list(F @ point)))
        shift = float(np.linalg.norm(moved - F @ point))
        self.assertTrue(math.isfinite(shift) and shift < 60.0, shift)

        logic.rename_model(self.method, name, "selftest_renamed")
        names = [m["name"] for m in logic.list_models(self.method)]
        self.assertIn("selftest_renamed", names)
        self.assertNotIn(name, names)
        logic.delete_model(self.method, "selftest_renamed")
        self.assertNotIn("selftest_renamed", [m["name"] for m in logic.list_models(self.method)])
        self.delayDisplay(f"Trained {self.steps} steps (stopped at {stopped_at}, resumed); losses "
                          f"{progress.losses[0]:.4f} -> {progress.losses[-1]:.4f}; validation Dice {dice[-1]:.3f}; "
                          f"the model moved a point by {shift:.2f} mm")
