"""A study tool for results/README.md: one training run that also scores other weight averages of G.

    python results/extra_averages.py dcgan_mnist.py --seed 0 --out results/study/dcgan_b64_s0

It runs the given script with the given flags, unchanged, and keeps beside the run's own average
(--ema) one extra average of G per row of EXTRAS, each with the decay min(cap, (1 + n) / (c + n))
after n steps: the run's own schedule is cap = --ema, c = 10. Whenever the run scores its own
average, every extra one is scored too (same samples, same noise), printed and appended to
<out>/extra_averages.jsonl. The averages never touch training, so one run compares them all. It
joins the training loop through loop.Hooks, as any tool may.
"""

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # The project's modules, from the repository root.

from ganlab import errors  # noqa: E402  (after sys.path: the project's package)
from ganlab.models import AveragedGenerator  # noqa: E402
from ganlab.run import loop  # noqa: E402

# (cap, c) of each extra average. The first repeats the default schedule of gan_mnist.py (--ema
# 0.999), so with --ema 0.999 its figures must equal the run's own: a check that the extras see
# exactly what the run sees.
EXTRAS = [(0.999, 10.0), (0.9995, 10.0), (0.9998, 10.0), (1.0, 10.0), (1.0, 4.0), (1.0, 2.0)]


class ExtraAverages(loop.Hooks):
    """Keeps the EXTRAS averages of G beside the run's own, and scores them whenever the run scores its own."""

    def __init__(self, out):
        self.out = Path(out)
        self.own, self.extras = None, []

    def step(self, train_step, state):
        averaged = state.averaged
        if averaged is None:
            raise errors.UsageError("argument --ema: the extra averages sit beside the run's own; use --ema > 0")
        self.own = averaged
        self.extras = [AveragedGenerator(state.generator, cap, averaged.refresh_inputs, warm_up)
                       for cap, warm_up in EXTRAS]

        def step_and_extra_averages(real_images, real_labels):
            values = train_step(real_images, real_labels)
            for extra in self.extras:
                extra.update()
            return values

        return step_and_extra_averages

    def evaluated(self, epoch, figures, score):
        step = int(self.own.updates.numpy())
        for (cap, warm_up), extra in zip(EXTRAS, self.extras):
            extra.refresh()
            scores = score(extra.model)
            row = {"step": step, "cap": cap, "c": warm_up,
                   **{key: scores[key] for key in ("fid", "inception_score", "classes_covered", "label_kl")}}
            print(f"  extra average cap {cap} c {warm_up:g} at step {step}: FID {scores['fid']:.3g}, "
                  f"IS {scores['inception_score']:.3g}, {scores['classes_covered']} classes, "
                  f"label KL {scores['label_kl']:.4f}", flush=True)
            with open(self.out / "extra_averages.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 2 or not sys.argv[1].endswith(".py") or "--out" not in sys.argv[2:-1]:
        sys.exit("usage: python results/extra_averages.py SCRIPT.py --out DIR [its other flags]")
    script, argv = sys.argv[1], sys.argv[2:]
    sys.argv = [script] + argv
    module = importlib.import_module(Path(script).stem)
    hooks = ExtraAverages(argv[argv.index("--out") + 1])
    errors.run_main(lambda arguments: module.main(arguments, hooks=hooks), argv)
