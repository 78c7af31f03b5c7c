"""Reading checkpoint files pickled by other programs (EE-LLM, Megatron-LM) without their code.

Megatron pickles its own classes into a checkpoint (``args.model_type`` is its ``ModelType`` enum, set by
``get_model``); this repository has no such modules. Classes of those packages that do not import here
load as inert :class:`ForeignObject` placeholders, so the checkpoints open (a model never needs them).
"""

from __future__ import annotations

import pickle
import types

__all__ = ["ForeignObject", "tolerant_pickle"]

_FOREIGN_PACKAGES = ("megatron", "apex", "transformer_engine")


class ForeignObject:
    """Stands in for an object of a class that exists only in the program that saved the checkpoint."""

    foreign_name = "unknown"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args = args
        return obj

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.foreign_name}{self.args if getattr(self, 'args', ()) else ''}>"


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            if module.split(".")[0] not in _FOREIGN_PACKAGES:
                raise
            return type(name, (ForeignObject,), {"foreign_name": f"{module}.{name}"})


# A ``pickle_module`` for ``torch.load``: the standard module with the tolerant unpickler.
tolerant_pickle = types.ModuleType("tolerant_pickle")
tolerant_pickle.Unpickler = _TolerantUnpickler
tolerant_pickle.load = lambda f, **kw: _TolerantUnpickler(f, **kw).load()
