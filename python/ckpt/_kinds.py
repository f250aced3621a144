"""Node kinds of the object tree (docs/FORMAT.md 7.1), read from the C++
table (include/ckpt/format.h kValueKinds) through the binding, as the
dtype table is (_dtypes.py)."""
import builtins

from . import _ckpt

# code -> (name, container, hashable); hashable = may be a dict key or a
# set item (a tuple or frozenset only when all it holds may be).
KINDS = {code: (name, container, hashable)
         for code, name, container, hashable in _ckpt.value_kinds()}
CODE = {name: code for code, (name, _, _) in KINDS.items()}

# Python type -> code of each container kind. A container kind is named
# after its builtin (list, tuple, dict, set, frozenset): a new one without
# a builtin of its name fails here, at import, until it is mapped.
CONTAINER_TYPES = {getattr(builtins, name): code
                   for code, (name, container, _) in KINDS.items() if container}
# Containers that may be keys (tuple, frozenset) and those never (list,
# dict, set).
HASHABLE_CONTAINERS = tuple(t for t, code in CONTAINER_TYPES.items() if KINDS[code][2])
UNHASHABLE_CONTAINERS = tuple(t for t, code in CONTAINER_TYPES.items() if not KINDS[code][2])
