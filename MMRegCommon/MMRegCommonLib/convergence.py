"""Convergence of an iterative method: the metric value per iteration, live and after the run.

Methods that optimise iteratively (LearnedMetric's similarity and B-spline stages) report each
optimiser iteration in their progress messages, and a trace of all values in their report
(``report["method_trace"] = {"similarity": ..., "stages": [{"stage", "level", "values"}]}``).
This module turns both into a :class:`ConvergenceTrace`: per stage and resolution level, the
values in order. From it come

* the panel's live view: one log line per iteration (:func:`log_line`) and a text sparkline per
  stage (:meth:`ConvergenceTrace.summary_lines`), pure Python, tested headless;
* after the run, a table and a plot chart in the scene (:func:`update_convergence_nodes`): a
  ``vtkMRMLTableNode`` (one row per iteration) and a ``vtkMRMLPlotChartNode`` with one series
  per stage and level, reused by the next run of the same module (so repeated runs do not pile
  up nodes), and available from the Python console as well as in the Plots view.

How a method's messages are read is the method's business (the engine's parser, e.g.
``mmreg.methods.metric.parse_metric_progress``): a module's Logic gives the parsed dicts to
:meth:`ConvergenceTrace.add`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Node attributes marking the convergence nodes of a module (value: the module name) and their role.
OWNER_ATTRIBUTE = "MMReg.ConvergenceOf"
ROLE_ATTRIBUTE = "MMReg.ConvergenceRole"
_BLOCKS = "▁▂▃▄▅▆▇█"
#: Series colours (one per stage and level), RGB 0..1.
COLOURS = ((0.16, 0.42, 0.80), (0.30, 0.65, 0.95), (0.85, 0.40, 0.10), (0.95, 0.65, 0.20),
           (0.20, 0.60, 0.30), (0.50, 0.80, 0.40), (0.60, 0.30, 0.70), (0.80, 0.50, 0.90))


@dataclass
class StageTrace:
    """The values of one optimisation stage at one resolution level, in iteration order.

    ``levels`` / ``iterations``: the planned number of levels and of iterations of this level
    (None when unknown, e.g. from a report). ``steps``: the iteration number of each value
    (1-based; live messages may skip iterations).
    """

    stage: str
    level: int
    levels: int | None = None
    iterations: int | None = None
    values: list = field(default_factory=list)
    steps: list = field(default_factory=list)

    @property
    def name(self) -> str:
        """"similarity level 1/2" (or "similarity level 1" when the number of levels is unknown)."""
        return f"{self.stage} level {self.level}" + (f"/{self.levels}" if self.levels else "")

    @property
    def column(self) -> str:
        """The table column of this stage's series ("similarity L1")."""
        return f"{self.stage} L{self.level}"


def _finite(values) -> list:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def sparkline(values, width: int = 24) -> str:
    """A text sparkline of ``values`` (``width`` block characters at most, one per bucket of values:
    its mean); "" for no finite value. Low values draw low blocks."""
    values = _finite(values)
    if not values:
        return ""
    width = max(1, min(int(width), len(values)))
    buckets = [values[i * len(values) // width:(i + 1) * len(values) // width] for i in range(width)]
    means = [sum(b) / len(b) for b in buckets if b]
    low, high = min(means), max(means)
    if high - low <= 1e-12 * max(1.0, abs(high)):
        return _BLOCKS[3] * len(means)
    scale = (len(_BLOCKS) - 1) / (high - low)
    return "".join(_BLOCKS[int(round((m - low) * scale))] for m in means)


def _number(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.5g}"


def log_line(point: dict) -> str:
    """One log line for a parsed progress point: "similarity 1/2  it.  7/40  metric 0.12345"."""
    levels = point.get("levels")
    iterations = point.get("iterations")
    level = f"{point['level']}/{levels}" if levels else f"{point['level']}"
    step = f"{point['iteration']:>3}/{iterations}" if iterations else f"{point['iteration']:>3}"
    return f"{point['stage']} {level}  it. {step}  metric {_number(float(point['value']))}"


class ConvergenceTrace:
    """Metric values per stage and level of one run (see the module docstring).

    ``similarity``: the metric's name (for titles). :attr:`stages` in the order they ran;
    :attr:`count`: points added so far (the Widget compares it to what it has shown).
    """

    def __init__(self, similarity: str = ""):
        self.similarity = similarity
        self.stages: list = []
        self.count = 0

    def __len__(self) -> int:
        return sum(len(s.values) for s in self.stages)

    def add(self, point: dict) -> StageTrace:
        """Add a parsed progress point (``stage``, ``level``, ``levels``, ``iteration``, ``iterations``,
        ``value``); a new stage starts when stage or level change or the iteration count restarts.
        Returns the stage it was added to."""
        current = self.stages[-1] if self.stages else None
        iteration = int(point["iteration"])
        if (current is None or current.stage != point["stage"] or current.level != int(point["level"])
                or (current.steps and iteration <= current.steps[-1])):
            current = StageTrace(str(point["stage"]), int(point["level"]), point.get("levels"),
                                 point.get("iterations"))
            self.stages.append(current)
        current.values.append(float(point["value"]))
        current.steps.append(iteration)
        self.count += 1
        return current

    @classmethod
    def from_report(cls, method_trace) -> "ConvergenceTrace | None":
        """The trace of a report's ``method_trace`` (``{"similarity": ..., "stages": [{"stage", "level",
        "values"}]}``); None when there is none. The number of levels is that of the stage's entries."""
        if not isinstance(method_trace, dict) or not method_trace.get("stages"):
            return None
        trace = cls(str(method_trace.get("similarity") or ""))
        entries = list(method_trace["stages"])
        for entry in entries:
            levels = sum(1 for e in entries if e.get("stage") == entry.get("stage")) or None
            values = [float(v) for v in entry.get("values") or []]
            trace.stages.append(StageTrace(str(entry.get("stage", "")), int(entry.get("level", 1)), levels,
                                           len(values), values, list(range(1, len(values) + 1))))
            trace.count += len(values)
        return trace

    def rows(self) -> list:
        """``[(index, stage index, iteration, value)]``: one row per value, ``index`` counting all stages from 1."""
        out, index = [], 0
        for number, stage in enumerate(self.stages):
            for step, value in zip(stage.steps, stage.values):
                index += 1
                out.append((index, number, step, value))
        return out

    def summary_lines(self, width: int = 24) -> list:
        """One line per stage: name, first -> last value, a sparkline (``width`` characters at most) and the
        iterations done (of planned); columns aligned for a fixed-width font."""
        rows = []
        for stage in self.stages:
            done = f"{len(stage.values)}" + (f"/{stage.iterations}" if stage.iterations else "")
            rows.append((stage.name + ":", _number(stage.values[0]), _number(stage.values[-1]),
                         sparkline(stage.values, width), f"({done} it.)"))
        widths = [max((len(row[i]) for row in rows), default=0) for i in range(4)]
        return [f"{name:<{widths[0]}} {first:>{widths[1]}} → {last:<{widths[2]}}  {spark:<{widths[3]}}  {done}"
                for name, first, last, spark, done in rows]


def _find(scene, owner: str, role: str) -> list:
    found = []
    for cls in ("vtkMRMLTableNode", "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode"):
        for i in range(scene.GetNumberOfNodesByClass(cls)):
            node = scene.GetNthNodeByClass(i, cls)
            if node.GetAttribute(OWNER_ATTRIBUTE) == owner and node.GetAttribute(ROLE_ATTRIBUTE) == role:
                found.append(node)
    return found


def _add(scene, cls: str, name: str, owner: str, role: str):
    node = scene.AddNewNodeByClass(cls, scene.GenerateUniqueName(name))
    node.SetAttribute(OWNER_ATTRIBUTE, owner)
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    return node


def convergence_table(trace: ConvergenceTrace):
    """A ``vtkTable`` of the trace: columns "iteration" (all stages, from 1), "stage", "level", "stage
    iteration", "metric", and one column per stage and level (:attr:`StageTrace.column`) holding that
    stage's values and NaN elsewhere (so each plot series draws only its stage)."""
    import vtk
    table = vtk.vtkTable()
    rows = trace.rows()

    def column(cls, name, values):
        array = cls()
        array.SetName(name)
        for value in values:
            array.InsertNextValue(value)
        table.AddColumn(array)

    column(vtk.vtkDoubleArray, "iteration", [float(r[0]) for r in rows])
    column(vtk.vtkStringArray, "stage", [trace.stages[r[1]].stage for r in rows])
    column(vtk.vtkIntArray, "level", [trace.stages[r[1]].level for r in rows])
    column(vtk.vtkIntArray, "stage iteration", [int(r[2]) for r in rows])
    column(vtk.vtkDoubleArray, "metric", [float(r[3]) for r in rows])
    for number, stage in enumerate(trace.stages):
        column(vtk.vtkDoubleArray, stage.column, [float(r[3]) if r[1] == number else math.nan for r in rows])
    return table


def update_convergence_nodes(scene, trace: ConvergenceTrace, owner: str, title: str = "") -> dict:
    """Show ``trace`` in the scene: the table and chart of module ``owner`` (made on first use, reused after),
    with one plot series per stage and level (remade each time).

    Returns ``{"table", "chart", "series": [...], "created": [node IDs added now]}``. ``title``: the
    chart's title (default: the owner and the metric's name).
    """
    import slicer
    created = []
    tables, charts = _find(scene, owner, "table"), _find(scene, owner, "chart")
    table = tables[0] if tables else None
    chart = charts[0] if charts else None
    if table is None:
        table = _add(scene, "vtkMRMLTableNode", f"{owner} convergence", owner, "table")
        created.append(table.GetID())
    if chart is None:
        chart = _add(scene, "vtkMRMLPlotChartNode", f"{owner} convergence plot", owner, "chart")
        created.append(chart.GetID())
    table.SetAndObserveTable(convergence_table(trace))
    chart.RemoveAllPlotSeriesNodeIDs()
    for old in _find(scene, owner, "series"):
        scene.RemoveNode(old)
    series = []
    for number, stage in enumerate(trace.stages):
        node = _add(scene, "vtkMRMLPlotSeriesNode", f"{owner} {stage.name}", owner, "series")
        node.SetAndObserveTableNodeID(table.GetID())
        node.SetXColumnName("iteration")
        node.SetYColumnName(stage.column)
        node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        node.SetColor(*COLOURS[number % len(COLOURS)])
        chart.AddAndObservePlotSeriesNodeID(node.GetID())
        series.append(node)
        created.append(node.GetID())
    chart.SetTitle(title or f"{owner}: {trace.similarity or 'metric'} per iteration")
    chart.SetXAxisTitle("iteration (all stages and levels)")
    chart.SetYAxisTitle("metric value (as optimised)")
    return {"table": table, "chart": chart, "series": series, "created": created}
