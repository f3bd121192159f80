"""The popcomp ops (``torch.ops.popcomp.*``): importing this package registers every op.

Layout (the dependencies point one way, nothing here imports this package back):

* ``_library.py``: the namespace ``LIB`` (a leaf);
* ``checks.py``: the argument and value checks every kernel of an op runs first, and the op
  codes, read from the compiled core;
* ``schemas.py``: each op's schema and fake (meta) kernel;
* ``backends/reference/<op>.py``: the pure-torch reference of each op, registered as its
  default kernel (every device; the test oracle);
* ``backends/cpu/<op>.py``, ``backends/cuda/<op>.py``: the kernels that call the compiled core,
  registered only when the core (with CUDA, for the latter) was built.
"""
from __future__ import annotations

from .._backend import compiled, cuda_built
from . import schemas  # noqa: F401  (defines the ops and their fake kernels first)
from .backends import reference  # noqa: F401  (the default kernel of every op)

if compiled() is not None:
    from .backends import cpu  # noqa: F401
if cuda_built():
    from .backends import cuda  # noqa: F401
