"""Pure-Python parts of the DisentangledRegistration module (no Qt, no Slicer): its method-specific options
(:mod:`DisentangledRegistrationLib.options`: the model selector showing each model's modalities and marking
representation-only (stage 1) models, the default model, the direction built from the model's modalities, the
translated-volume switch, the refinement similarity, and how they become the engine's ``disentangled`` options)."""
