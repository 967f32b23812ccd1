"""The RegistrationTraining module's parts that need neither Qt nor Slicer (tested headless).

* :mod:`~RegistrationTrainingLib.runner`: the training process (``python -m mmreg train``),
  its command line, stop/resume and polling;
* :mod:`~RegistrationTrainingLib.progress`: the run's state from its progress events;
* :mod:`~RegistrationTrainingLib.panelstate`: what the panel offers and allows, and why.
"""
