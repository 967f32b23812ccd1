"""mmreg: learning-based mono- and multi-modal deformable registration in physical space.

The engine of the 3D Slicer extension; plain Python (torch, SimpleITK, MONAI), no Slicer imports.

    import mmreg
    result = mmreg.register("fixed.nii.gz", "moving.nii.gz", method="optimize")
    result.save("transform.h5", "warped.nii.gz")

Conventions: images are SimpleITK images in LPS physical space; a result is a displacement
field u on the fixed image's grid in mm, fixed point x <-> moving point x + u(x).
"""
__version__ = "0.1.0"

from .errors import CancelledError, InputError, MMRegError, WeightsError  # noqa: E402
from .image import read_image, read_labels, write_image  # noqa: E402
from .methods import describe_methods, get_method, method_names  # noqa: E402
from .pipeline import RegistrationResult, evaluate, register  # noqa: E402
from .transforms import read_displacement, read_transform, write_transform  # noqa: E402

__all__ = [
    "__version__", "register", "evaluate", "RegistrationResult", "read_image", "read_labels", "write_image",
    "read_transform", "read_displacement", "write_transform", "get_method", "method_names", "describe_methods",
    "MMRegError", "InputError", "WeightsError", "CancelledError",
]
