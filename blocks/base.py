"""The base of every Burrow block: configuration as a pydantic model that does not import Prefect.

``burrow list``, ``inspect``, ``status``, ``dump`` and ``keygen`` run without Prefect (issue 11:
they answer in well under a second, while ``import prefect`` alone takes 1 to 2 s). So sources,
stores, keys and retention policies are plain pydantic models here, and each has a **Prefect
twin**: a subclass that is also a :class:`prefect.blocks.core.Block`, with the same block type
name, slug, description and fields, made the first time something needs Prefect:

* ``ZooKeeperCluster(...).save("dc-us")`` saves through the twin (a block document of type
  ``burrow-zookeeper-cluster``, secrets stored encrypted as Prefect stores them);
* ``ZooKeeperCluster.load("dc-us")`` and ``Block.load("burrow-zookeeper-cluster/dc-us")``
  return an instance of the twin, which *is* a ``ZooKeeperCluster``: flows and tasks never tell
  the two apart;
* ``deployments/setup.py`` registers the twins' block types so the UI can create them.

A twin is registered with Prefect's block registry when it is made;
:func:`blocks.registry.register_twins` makes every one (a lookup by slug needs them).
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict

_twins: dict[type, type] = {}
_lock = threading.RLock()


class BurrowBlock(BaseModel):
    """Configuration of a source, store, key set or policy (see the module docstring)."""

    # A misspelt field is an error here, not silently kept (Prefect's Block allows extras; the
    # twin does, so documents saved by a newer Burrow still load).
    model_config = ConfigDict(extra="forbid")

    _block_type_name: ClassVar[str | None] = None
    _block_type_slug: ClassVar[str | None] = None
    _description: ClassVar[str | None] = None

    @classmethod
    def _twin_fields(cls) -> dict[str, tuple[Any, Any]]:
        """Fields whose type the twin narrows to Prefect block classes (so Prefect saves them as
        references to other block documents): ``{name: (annotation, FieldInfo)}``."""
        return {}

    @classmethod
    def prefect_block(cls) -> type:
        """This class's Prefect twin (imports Prefect)."""
        return prefect_twin(cls)

    def as_prefect_block(self) -> Any:
        """This configuration as an instance of the Prefect twin (itself if it is one)."""
        twin = prefect_twin(type(self))
        if isinstance(self, twin):
            return self
        return twin(**{name: getattr(self, name) for name in type(self).model_fields})

    def save(self, name: str, overwrite: bool = False) -> UUID:
        """Save as the Prefect block document ``name`` (imports Prefect; needs its API)."""
        return self.as_prefect_block().save(name, overwrite=overwrite)

    @classmethod
    def load(cls, name: str) -> Any:
        """The saved block document ``name`` of this type, as an instance of the twin (a
        subclass of ``cls``). Raises ValueError when there is none, like Prefect's Block."""
        return prefect_twin(cls).load(name)


def _no_load_event(self: Any) -> None:
    """The twin's ``Block._event_method_called_resources``: no resource, so no load event."""
    return None


def prefect_twin(cls: type[BurrowBlock]) -> type:
    """The Prefect ``Block`` subclass of ``cls`` (made and registered once)."""
    if getattr(cls, "__burrow_twin_of__", None) is not None:
        return cls  # already a twin
    with _lock:
        twin = _twins.get(cls)
        if twin is not None:
            return twin
        from prefect.blocks.core import Block

        namespace: dict[str, Any] = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "__burrow_twin_of__": cls,
            # BurrowBlock's save/load come first in the twin's MRO: give it Prefect's back.
            "save": vars(Block)["save"],
            "load": vars(Block)["load"],
            # No ``prefect.block.<slug>.loaded`` event per load: every run loads several blocks
            # (source, store, keys), and those events buried Burrow's own in the UI's event feed
            # (issue 18). Prefect has no setting for it; it emits the event only when this hook
            # names the block document, so the twin's names none.
            "_event_method_called_resources": _no_load_event,
        }
        annotations: dict[str, Any] = {}
        for name, (annotation, info) in cls._twin_fields().items():
            annotations[name] = annotation
            namespace[name] = info
        if annotations:
            namespace["__annotations__"] = annotations
        twin = type(cls.__name__, (cls, Block), namespace)
        _twins[cls] = twin
        return twin
