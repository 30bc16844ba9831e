"""A study tool for results/README.md: one training run that also scores other weight averages of G.

    python results/extra_averages.py dcgan_mnist.py --seed 0 --out results/study/dcgan_b64_s0

It runs the given script with the given flags, unchanged, and keeps beside the run's own average
(--ema) one extra average of G per row of EXTRAS, each with the decay min(cap, (1 + n) / (c + n))
after n steps: the run's own schedule is cap = --ema, c = 10. Whenever the run scores its own
average, every extra one is scored too (same samples, same noise), printed and appended to
<out>/extra_averages.jsonl. The averages never touch training, so one run compares them all.
"""

import json
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # utils.py, from the repository root.

import utils  # noqa: E402

AveragedGenerator = utils.AveragedGenerator  # The project's own, before the swap at the bottom.

# (cap, c) of each extra average. The first repeats the default schedule (--ema 0.999), so its
# figures must equal the run's own: a check that the extras see exactly what the run sees.
EXTRAS = [(0.999, 10.0), (0.9995, 10.0), (0.9998, 10.0), (1.0, 10.0), (1.0, 4.0), (1.0, 2.0)]


class AveragesBesideTheRunsOwn(AveragedGenerator):
    """The run's own average (as in utils), updating the extra ones after each of its own updates."""

    latest = None

    def __init__(self, generator, decay, refresh_inputs):
        super().__init__(generator, decay, refresh_inputs)
        self.extras = [AveragedGenerator(generator, cap, refresh_inputs, warm_up) for cap, warm_up in EXTRAS]
        AveragesBesideTheRunsOwn.latest = self

    def update(self):
        super().update()
        for extra in self.extras:
            extra.update()


_evaluate_generator = utils.evaluate_generator


def evaluate_with_extras(evaluator, generator, count, seed, transform, config):
    """utils.evaluate_generator; when it scores the run's own average, it scores every extra too."""
    figures = _evaluate_generator(evaluator, generator, count, seed, transform, config)
    own = AveragesBesideTheRunsOwn.latest
    if own is not None and generator is own.model:
        step = int(own.updates.numpy())
        for (cap, warm_up), extra in zip(EXTRAS, own.extras):
            extra.refresh()
            scores = _evaluate_generator(evaluator, extra.model, count, seed, transform, config)
            row = {"step": step, "cap": cap, "c": warm_up,
                   **{key: scores[key] for key in ("fid", "inception_score", "classes_covered", "label_kl")}}
            print(f"  extra average cap {cap} c {warm_up:g} at step {step}: FID {scores['fid']:.3g}, "
                  f"IS {scores['inception_score']:.3g}, {scores['classes_covered']} classes, "
                  f"label KL {scores['label_kl']:.4f}", flush=True)
            with open(os.path.join(config.out, "extra_averages.jsonl"), "a") as handle:
                handle.write(json.dumps(row) + "\n")
    return figures


if __name__ == "__main__":
    if len(sys.argv) < 2 or not sys.argv[1].endswith(".py"):
        sys.exit("usage: python results/extra_averages.py SCRIPT.py [its flags]")
    utils.AveragedGenerator = AveragesBesideTheRunsOwn
    utils.evaluate_generator = evaluate_with_extras
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
