# Copyright (c) UPSNetRobust authors.
"""Set-up checks of data set names against detectron2's catalog.

An unregistered ``DATASETS.TEST`` name otherwise surfaces much later, e.g. as
``AttributeError: ... metadata is empty`` from whatever reads its metadata first.
"""

import difflib
from detectron2.data import DatasetCatalog

__all__ = ["DatasetNotRegisteredError", "check_dataset_registered"]


class DatasetNotRegisteredError(KeyError):
    """A config names a data set that is not in detectron2's ``DatasetCatalog``."""

    def __str__(self):  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def check_dataset_registered(name: str, key: str = "DATASETS.TEST") -> None:
    """Check that ``name`` (the value of config key ``key``) is a registered data set.

    Args:
        name (str): a data set name, e.g. from ``cfg.DATASETS.TEST``.
        key (str): the config key it comes from, quoted in the error.

    Raises:
        DatasetNotRegisteredError (a KeyError): naming ``key``, ``name``, the closest registered
            names and then all registered names.
    """
    registered = list(DatasetCatalog.list())
    if isinstance(name, str) and name in registered:
        return
    if not isinstance(name, str):
        raise DatasetNotRegisteredError(
            f"{key} must hold data set names (str), got {name!r} of type {type(name).__name__}"
        )
    close = difflib.get_close_matches(name, registered, n=5, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise DatasetNotRegisteredError(
        f"{key} names data set {name!r}, which is not registered in detectron2's DatasetCatalog."
        f"{hint} Registered data sets ({len(registered)}, closest first): "
        + ", ".join(close + sorted(set(registered) - set(close)))
    )
