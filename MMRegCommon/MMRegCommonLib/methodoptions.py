"""Method-specific options: controls that only one method module has, bound to its parameter node
and passed to the engine as that method's options.

The shared panel covers what every method has (inputs, model, device, affine, outputs). A method
with options of its own (LearnedMetric: metric, transformation model, control-point spacing,
levels, iterations) declares them once, as a :class:`MethodOptions` with one
:class:`OptionControl` per parameter; the framework then

* passes them to the engine when the module's Logic runs from its parameter node
  (:meth:`MethodOptions.engine_options`, used by ``RegistrationLogic.run_with_parameters``);
* fills the module's run-time combo boxes (:meth:`MethodOptions.combo_items`, and
  :meth:`MethodOptions.value_combo_items` for those whose items follow the current choices), enables or
  disables each control for the current choices (:meth:`MethodOptions.control_states`), shows a
  line about the current choice (:meth:`MethodOptions.info_text`) and keeps Apply disabled with
  a reason while the choices cannot run (:meth:`MethodOptions.problem`).

In the module's ``.ui`` file the controls sit in a section named ``methodOptionsCollapsibleButton``
(disabled while a registration runs), each bound to its parameter like the shared ones
(``SlicerParameterName``, or ``MMRegParameterName`` for combo boxes filled here). Everything in
this file is plain Python (no Qt, no Slicer), so it is unit-tested headless and the offscreen
panel rendering uses it too.
"""
from __future__ import annotations

from dataclasses import dataclass


def _text(value) -> str:
    return str(value)


@dataclass(frozen=True)
class OptionControl:
    """One method-specific control: a parameter of the module's parameter node and the engine option it sets.

    ``parameter``: the parameter's name (camelCase, as in the parameter node); ``option``: the
    engine option (a key of the method's ``default_options()``); ``convert``: parameter value ->
    engine value (e.g. ``int``; the default keeps a string). ``applies_when``: ``(parameter,
    values)``: the control is used only while that other parameter has one of ``values``; otherwise
    the control is disabled (tooltip ``unused_tip``) and its option is not passed (the method's
    default applies).
    """

    parameter: str
    option: str
    convert: object = _text
    applies_when: tuple | None = None
    unused_tip: str = ""


def combined_state(states: dict, names) -> tuple | None:
    """``(enabled, tooltip)`` of one widget bound to the parameters ``names`` (a combo box may set several), from
    :meth:`MethodOptions.control_states`: enabled when any of them is; the tooltip of the first disabled one
    otherwise. None when no control of these options uses those parameters."""
    found = [states[name] for name in names if name in states]
    if not found:
        return None
    if any(enabled for enabled, _ in found):
        return True, ""
    return False, next((tip for _, tip in found if tip), "")


class MethodOptions:
    """The method-specific controls of one module (none in the base class: a module without its own options).

    Subclasses set :attr:`controls` and :attr:`combo_bindings`, and override :meth:`combo_items`,
    :meth:`resolve`, :meth:`problem` and :meth:`info_text` where their choices need it. ``values``
    arguments are ``{parameter name: value}`` dicts (see :meth:`values`), so that every decision is
    testable without a parameter node.
    """

    #: The controls, in the order of the panel.
    controls: tuple = ()
    #: The bindings (``MMRegParameterName`` values) of the combo boxes this class fills at run time.
    combo_bindings: tuple = ()
    #: Other parameters (e.g. the shared ``refinementSteps``) read into :meth:`values` only to decide
    #: whether a control applies (:meth:`applies`); never passed to the engine by these options.
    context_parameters: tuple = ()

    @property
    def parameters(self) -> tuple:
        """Every parameter name these options use (controls and combo boxes), without repeats."""
        names = [c.parameter for c in self.controls]
        for binding in self.combo_bindings:
            names += [n.strip() for n in binding.split(",") if n.strip()]
        return tuple(dict.fromkeys(names))

    def controls_parameter(self, name: str) -> bool:
        """True when a control of these options sets parameter ``name`` (e.g. "model")."""
        return any(c.parameter == name for c in self.controls)

    def values(self, parameters) -> dict:
        """``{name: value}`` of :attr:`parameters` and :attr:`context_parameters` read from a parameter node
        wrapper (or any object with them)."""
        return {name: getattr(parameters, name) for name in self.parameters + tuple(self.context_parameters)}

    def resolve(self, values: dict, status) -> dict:
        """The values that will run: ``values`` with what the current method status implies filled in (e.g.
        the default model for an unset one). The base class changes nothing."""
        return dict(values)

    def changes(self, values: dict, status) -> dict:
        """``{name: value}`` that :meth:`resolve` changes (the Widget writes them into the parameter node, so
        that the panel shows what Apply runs)."""
        resolved = self.resolve(values, status)
        return {name: value for name, value in resolved.items() if values.get(name) != value}

    def applies(self, control: OptionControl, values: dict) -> bool:
        """Whether ``control`` is used with these values (see :attr:`OptionControl.applies_when`; a subclass may
        decide otherwise, e.g. from a :attr:`context_parameters` value)."""
        if control.applies_when is None:
            return True
        other, allowed = control.applies_when
        return values.get(other) in tuple(allowed)

    def engine_options(self, values: dict, status) -> dict:
        """The engine options for these parameter values (resolved first); controls that do not apply are left out.

        Raises :class:`mmreg.InputError` when the method lacks an option a control sets (the module
        and the engine do not match) and when :meth:`problem` finds the choices unusable.
        """
        from mmreg import InputError
        values = self.resolve(values, status)
        problem = self.problem(values, status)
        if problem:
            raise InputError(problem)
        options = {}
        for control in self.controls:
            if not self.applies(control, values):
                continue
            if control.option not in status.options:
                raise InputError(f"Method '{status.name}' has no option '{control.option}' (set by the panel's "
                                 f"'{control.parameter}'): this engine version does not match the module.")
            options[control.option] = control.convert(values[control.parameter])
        return options

    def control_states(self, values: dict, status) -> dict:
        """``{parameter: (enabled, tooltip)}`` of the controls; tooltip "" keeps the one of the ``.ui`` file."""
        values = self.resolve(values, status)
        states = {}
        for control in self.controls:
            if not status.available:
                states[control.parameter] = (False, status.reason)
            elif not self.applies(control, values):
                states[control.parameter] = (False, control.unused_tip)
            else:
                states[control.parameter] = (True, "")
        return states

    def combo_items(self, status) -> dict:
        """``{binding: [(value, label, tooltip), ...]}`` for the combo boxes of :attr:`combo_bindings` (values
        are tuples for a combo box bound to several parameters). The base class has none."""
        return {}

    def value_combo_items(self, values: dict, status) -> dict:
        """``{binding: [(value, label, tooltip), ...]}`` of combo boxes whose items depend on the current choices
        (e.g. the registration direction offered by the chosen model's modalities), for the resolved
        ``values``. The Widget refills them whenever the parameters change (only when their items
        differ); :meth:`resolve` should keep such a parameter's value among its items. The base class has
        none."""
        return {}

    def problem(self, values: dict, status) -> str | None:
        """Why these choices cannot run (a sentence for the user; Apply stays disabled), or None."""
        return None

    def info_text(self, values: dict, status) -> str:
        """A line about the current choices, shown under the controls ("" for none)."""
        return ""
