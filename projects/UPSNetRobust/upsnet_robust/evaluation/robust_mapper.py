# Copyright (c) UPSNetRobust authors.
"""A dataset-mapper wrapper that turns an unreadable image into a recorded failure, so a long
sweep goes on and its report counts the image instead of dying in a loader worker."""
import logging
from typing import Callable, Dict

__all__ = ["RobustMapper"]

logger = logging.getLogger(__name__)


class RobustMapper:
    """Calls ``mapper(dataset_dict)``; on an error reading or decoding the files returns
    ``{"file_name", "image_id", "error"}`` naming the file and the cause."""

    def __init__(self, mapper: Callable[[Dict], Dict]):
        self.mapper = mapper

    def __call__(self, dataset_dict: Dict) -> Dict:
        try:
            return self.mapper(dataset_dict)
        except (OSError, ValueError, SyntaxError) as e:  # PIL / decoding errors of corrupt files
            file_name = dataset_dict.get("file_name", "<unknown>")
            message = f"cannot read {file_name}: {type(e).__name__}: {e}"
            logger.warning("Skipping image: %s", message)
            return {
                "file_name": file_name,
                "image_id": dataset_dict.get("image_id", file_name),
                "error": message,
            }
