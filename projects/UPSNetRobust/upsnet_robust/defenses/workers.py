# Copyright (c) UPSNetRobust authors.
"""Defense worker processes: CPU defenses run beside the model instead of between its calls.

The attack hook submits every (image, defense) job of a batch as soon as the adversarial images
exist, then runs the undefended inference while the workers denoise; each defended batch is
inferred as its images come back. On a GPU machine the model and the CPU defenses then overlap;
with several workers the images of a batch are also defended in parallel (OpenCV's NL-means
uses one core per image at a time in a worker).

Workers are spawned (not forked: the parent holds torch/OpenMP threads and possibly CUDA) once
per sweep and each limits itself to ``threads_per_worker`` OpenCV and torch threads.
"""
import logging
import multiprocessing as mp
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Tuple

import torch

from .tensor import apply_defense_to_tensor

__all__ = ["DefenseWorkers"]

logger = logging.getLogger(__name__)


def _init_worker(threads: int) -> None:
    import cv2

    cv2.setNumThreads(threads)
    torch.set_num_threads(threads)


def _defend(transform, image: torch.Tensor, input_format: str) -> Tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = apply_defense_to_tensor(transform, image, input_format)
    return out, time.perf_counter() - start


class DefenseWorkers:
    """A pool of spawned processes that apply numpy defense transforms to CPU tensors.

    Args:
        num_workers (int): processes (>= 1).
        threads_per_worker (int): OpenCV / torch threads in each worker.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, num_workers: int, threads_per_worker: int = 1):
        if int(num_workers) < 1:
            raise ValueError(f"DefenseWorkers needs num_workers >= 1, got {num_workers}")
        self.num_workers = int(num_workers)
        self._executor = ProcessPoolExecutor(
            max_workers=self.num_workers,
            mp_context=mp.get_context("spawn"),
            initializer=_init_worker,
            initargs=(int(threads_per_worker),),
        )
        logger.info(
            "Started %d defense worker process(es), %d thread(s) each",
            self.num_workers,
            threads_per_worker,
        )

    @staticmethod
    def accepts(transform) -> bool:
        """Whether a worker can run it: numpy defenses on the CPU (a torch backend on a GPU
        stays in the main process)."""
        return transform is not None and getattr(transform, "backend", "opencv") != "torch"

    def submit(self, transform, image: torch.Tensor, input_format: str = "BGR") -> Future:
        """Defend one (3, H, W) image; the future gives ``(defended CPU tensor, seconds)``,
        the seconds measured inside the worker (the defense's own cost)."""
        return self._executor.submit(_defend, transform, image.detach().cpu(), input_format)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "DefenseWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
