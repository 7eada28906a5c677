"""Benchmark: the ensemble fit on 2,000 questions x 3 members x 500 Adam steps (target < 2 s on CPU).

    python bench/ensemble_fit.py [--questions 2000] [--steps 500] [--repeats 3] [--config configs/ensemble.yaml]

Synthetic members (``aqa.ensemble.simulate_members``): one 4x overconfident, one calibrated, one pure noise,
with 2-5 options per question so the padding mask is in play. The lr comes from the config. The median of
``--repeats`` fits is reported (the first includes torch's warm-up; the machine may be shared). The last line is ``fit_s=X.XX target<2``.
"""

from __future__ import annotations

import argparse
import time

from aqa.config import load_config
from aqa.ensemble.fusion import fit, fused_log_probs, member_log_probs, simulate_members, system_metrics
from aqa.ensemble.run import EnsembleConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default="configs/ensemble.yaml", help="where the fit's lr comes from")
    args = parser.parse_args()
    cfg = load_config(EnsembleConfig, args.config)

    data = simulate_members(args.questions, signal=[1.2, 1.0, 0.0], scale=[4.8, 1.0, 1.0], seed=0)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = fit(data, args.steps, cfg.fit.lr, cfg.fit.init_temperature)
        times.append(time.perf_counter() - t0)

    singles = [system_metrics(data, lp)["accuracy"] for lp in member_log_probs(data)]
    fused = system_metrics(data, fused_log_probs(data, result.fusion))
    print(f"{args.questions} questions x {len(data.members)} members x {args.steps} steps, lr {cfg.fit.lr}")
    print(f"weights {[round(w, 3) for w in result.weights]}  temperatures {[round(t, 2) for t in result.temperatures]}")
    print(f"member accuracy {[round(a, 3) for a in singles]}  fused {fused['accuracy']:.3f}  "
          f"NLL {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
    print(f"all fits (s): {' '.join(f'{t:.2f}' for t in times)}")
    print(f"fit_s={sorted(times)[len(times) // 2]:.2f} target<2")


if __name__ == "__main__":
    main()
