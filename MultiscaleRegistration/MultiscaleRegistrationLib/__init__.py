"""Pure-Python parts of the MultiscaleRegistration module (no Qt, no Slicer): its method-specific options
(:mod:`MultiscaleRegistrationLib.options`: the model selector showing each FMIRNet's number of scales, the
default model, the refinement similarity, and how they become the engine's ``multiscale`` options)."""
