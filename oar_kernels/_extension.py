"""Loads the optional C++ extension in one place and remembers why it did or did not load."""

import os

from oar_kernels import _ops  # noqa: F401  (the schemas exist before the C++ kernels register)

LOADED = False
STATUS = "not built"

if os.environ.get("OAR_KERNELS_NO_EXTENSION") == "1":
    STATUS = "disabled by OAR_KERNELS_NO_EXTENSION=1"
else:
    try:
        from oar_kernels import _C  # noqa: F401  (importing registers the CPU kernels)
    except ImportError as exc:
        STATUS = f"not built ({exc}); install with `pip install --no-build-isolation .`"
    else:
        LOADED = True
        STATUS = f"loaded from {_C.__file__}"
