"""Pure-Python parts of the GradRegistration module (no Qt, no Slicer): its method-specific options
(:mod:`GradRegistrationLib.options`: the model selector showing each GradNet's variant (gated fusion, average
fusion, VM, VM(concat)) and modality pair (CT-MR, MR-MR), the default model, the refinement similarity, whether
gate maps are available, and how they become the engine's ``grad`` options)."""
