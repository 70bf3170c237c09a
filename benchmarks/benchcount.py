# Copyright (c) UPSNetRobust authors.
"""Instruments of the sweep-economy benchmark: they count a sweep's work from OUTSIDE the package
(model calls by mode, input backwards, defense calls, each pass's attack counters and times)."""

import time
from collections import Counter

import torch

__all__ = ["CountingTransform", "count_attacks", "count_passes", "instrument_model"]


class CountingTransform:
    """Proxy of a defense transform that counts ``apply_image`` calls (everything else is
    delegated)."""

    def __init__(self, transform, counter: Counter, key: str):
        self._transform = transform
        self._counter = counter
        self._key = key

    def apply_image(self, img):
        self._counter[self._key] += 1
        start = time.perf_counter()
        try:
            return self._transform.apply_image(img)
        finally:
            self._counter["seconds:defense"] += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self._transform, name)


def instrument_model(model, counter: Counter) -> None:
    """Count model calls by mode, and input-gradient backwards, via instance attributes.

    An inference is counted once per image at the outermost of ``model.forward`` (eval mode)
    and ``model.inference``: the sweep's hook calls ``inference(..., panoptic_only=True)``
    directly, and ``forward`` in eval mode delegates to ``inference`` (counted once, not twice).
    Training-loss forwards are ``forward`` in training mode or ``per_image_losses`` (batched
    attacks); those without a gradient (the value at the adversarial images the cells record as
    ``attack_loss``) are counted apart, as ``forward_loss``.
    """
    forward, inference, predict = model.forward, model.inference, model.predict
    depth = {"inference": 0}

    def count_train(batched_inputs):
        if not torch.is_grad_enabled():  # the objective's value only (the final-loss record)
            counter["forward_loss"] += len(batched_inputs)
            return
        counter["forward_train"] += len(batched_inputs)
        for x in batched_inputs:
            image = x.get("image")
            if image is not None and image.requires_grad:
                image.register_hook(_count_backward(counter))

    def counted_inference_call(fn, batched_inputs, *args, **kwargs):
        depth["inference"] += 1
        outermost = depth["inference"] == 1
        if outermost:
            counter["inference"] += len(batched_inputs)
        start = time.perf_counter()
        try:
            return fn(batched_inputs, *args, **kwargs)
        finally:
            depth["inference"] -= 1
            if outermost:
                counter["seconds:inference"] += time.perf_counter() - start

    def counted_forward(batched_inputs, *args, **kwargs):
        if model.training:
            count_train(batched_inputs)
            return forward(batched_inputs, *args, **kwargs)
        return counted_inference_call(forward, batched_inputs, *args, **kwargs)

    def counted_inference(batched_inputs, *args, **kwargs):
        return counted_inference_call(inference, batched_inputs, *args, **kwargs)

    def counted_predict(batched_inputs, *args, **kwargs):
        counter["predict"] += len(batched_inputs)
        return predict(batched_inputs, *args, **kwargs)

    model.forward = counted_forward
    model.inference = counted_inference
    model.predict = counted_predict
    if hasattr(model, "per_image_losses"):  # the batched attacks' training-loss path
        per_image_losses = model.per_image_losses

        def counted_per_image_losses(batched_inputs, *args, **kwargs):
            count_train(batched_inputs)
            return per_image_losses(batched_inputs, *args, **kwargs)

        model.per_image_losses = counted_per_image_losses


def _count_backward(counter):
    """A tensor hook counting one backward pass to an input image."""

    def hook(grad):
        counter["input_backward"] += 1
        return grad

    return hook


def count_attacks(sweep, counter: Counter) -> None:
    """Time each pass's ``attack.perturb``, wrapping the sweep's image-step builder from
    outside (an attack pass's step holds its attack)."""
    build = sweep._step

    def recording_step(spec, pass_dir=None):
        step = build(spec, pass_dir)
        attack = getattr(step, "attack", None)
        if attack is not None:
            perturb = attack.perturb

            def timed_perturb(*a, **k):
                start = time.perf_counter()
                try:
                    return perturb(*a, **k)
                finally:
                    counter["seconds:attack"] += time.perf_counter() - start

            attack.perturb = timed_perturb
        return step

    sweep._step = recording_step


def _pass_record(spec, attack, delta: Counter, seconds: float) -> dict:
    """One pass's counts (model calls, the attack's own counters, defense calls) and times."""
    desc = attack.describe() if attack is not None else {}
    record = {
        "attack": spec["attack"],
        "eps": spec["eps"],
        "T": int(desc.get("num_steps", 0) or 0),
        "forward_backward": delta["forward_train"],
        "input_backward": delta["input_backward"],
        "attack_counter_forward_backward": getattr(attack, "num_forward_backward", 0),
        "forward_only": getattr(attack, "num_forward", 0),
        "loss_forward": delta["forward_loss"],
        "inference": delta["inference"],
        "predict": delta["predict"],
        "defense_calls": {
            k.split(":", 1)[1]: v for k, v in delta.items() if k.startswith("defense:")
        },
        "seconds": seconds,
        "seconds_attack": delta["seconds:attack"],
        "seconds_defense": delta["seconds:defense"],
        "seconds_inference": delta["seconds:inference"],
    }
    record["seconds_other"] = (
        seconds - record["seconds_attack"] - record["seconds_defense"] - record["seconds_inference"]
    )
    return record


def count_passes(sweep, counter: Counter) -> list:
    """Wrap the sweep's pass runner: the returned list gets one :func:`_pass_record` per pass."""
    per_pass, built = [], []
    run_pass, build = sweep._run_pass, sweep._step

    def recording_step(spec, pass_dir=None):
        built.append(build(spec, pass_dir))
        return built[-1]

    def counted_run_pass(spec, pass_dir):
        before = Counter(counter)
        start = time.perf_counter()
        built.clear()
        cells = run_pass(spec, pass_dir)
        delta = Counter(counter)
        delta.subtract(before)
        attack = getattr(built[-1], "attack", None) if built else None
        per_pass.append(_pass_record(spec, attack, delta, time.perf_counter() - start))
        return cells

    sweep._step = recording_step
    sweep._run_pass = counted_run_pass
    return per_pass
