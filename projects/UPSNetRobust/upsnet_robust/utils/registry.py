# Copyright (c) UPSNetRobust authors.
"""The one place where the project adds objects to detectron2 (fvcore) registries."""

from detectron2.utils.registry import Registry

__all__ = ["register_as", "subclass_decorator"]


def register_as(registry: Registry, name: str, obj) -> None:
    """Add ``obj`` to ``registry`` under ``name``.

    fvcore's public ``Registry.register`` keys an object by its ``__name__``; the project's
    registries are keyed by config names instead (short lower-case keys such as "pgd", or
    meta-architecture names). Every public ``register_*`` decorator of the project (attacks,
    objectives, defenses, surrogates, model adapters) goes through this call, which is what
    ``register`` does once it has a name (it keeps fvcore's duplicate-name check).

    Raises:
        AssertionError: ``name`` is already registered in ``registry`` (fvcore's check).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A registry name must be a non-empty string, got {name!r}")
    registry._do_register(name, obj)


def subclass_decorator(registry: Registry, base: type, *names: str, attribute: str = ""):
    """A class decorator that registers a subclass of ``base`` under ``names`` (and sets
    ``cls.<attribute>`` to the first name when ``attribute`` is given): the shared body of the
    project's ``register_*`` decorators.

    Raises:
        TypeError: the decorated object is not a subclass of ``base``.
    """

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"{cls!r} is not a subclass of {base.__name__}")
        if attribute:
            setattr(cls, attribute, names[0])
        for name in names:
            register_as(registry, name, cls)
        return cls

    return deco
