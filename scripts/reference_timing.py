"""The timing protocol of the PyTorch references (scripts/torch_*_reference.py), the same as
benches/compare_backends.rs measures Kiln with: the first training step on its own, untimed
warm-up steps, then timed steps; forward-only passes after three untimed ones; peak RSS.
And the optimizer update those steps share with Kiln's `train_step`."""
import resource
import time

import torch


def optimizer_step(model, optimizer, loss, grad_clip):
    """Backward, global-norm clipping at `grad_clip` (0: none), the optimizer's update; the
    loss read back to the host (which also waits for the step) -> float."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def time_training(train_step, warmup_steps, steps):
    """Run train_step(step) (which returns the loss) 1 + warmup_steps + steps times ->
    (seconds of the first step, seconds of each timed step, the last loss)."""
    t0 = time.perf_counter()
    train_step(0)
    first_step_s = time.perf_counter() - t0
    for step in range(1, 1 + warmup_steps):
        train_step(step)
    times, loss = [], float("nan")
    for step in range(1 + warmup_steps, 1 + warmup_steps + steps):
        t0 = time.perf_counter()
        loss = train_step(step)
        times.append(time.perf_counter() - t0)
    return first_step_s, times, loss


def time_calls(fn, steps, untimed=3):
    """Seconds of each of `steps` calls of fn() after `untimed` ones."""
    times = []
    for i in range(untimed + steps):
        t0 = time.perf_counter()
        fn()
        if i >= untimed:
            times.append(time.perf_counter() - t0)
    return times


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
