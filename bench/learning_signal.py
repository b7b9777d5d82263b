"""Learning signal of each objective: held-out ranking accuracy after the same steps on the same data.

The synthetic dataset (sajax.data.demo) rates each response by the share of considerate words it uses, so a
model can learn the property the ratings depend on. Every objective trains the tiny config from the same
initialisation on the same batches; the table shows the validation split's pairwise ranking accuracy (chance
0.5) and best-response NLL at the end.

    python bench/learning_signal.py [--steps 200]
"""

import argparse
import tempfile
from pathlib import Path

from sajax.config_files import load_module
from sajax.train import loop
from sajax.train.losses import OBJECTIVES


tiny = load_module(Path(__file__).resolve().parent.parent / "configs" / "tiny.py")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    results = {}
    for objective in OBJECTIVES:
        cfg = tiny.get_config()
        cfg.train.objective = objective
        cfg.train.steps = args.steps
        cfg.eval_every = 0
        with tempfile.TemporaryDirectory() as workdir:
            results[objective] = loop.run(cfg, workdir)
    print(f"\n{'objective':18s} {'ranking accuracy':>17s} {'best-response NLL':>18s}   ({args.steps} steps, "
          f"{int(results['sft']['groups'])} held-out groups)")
    for objective, final in results.items():
        print(f"{objective:18s} {final['ranking_accuracy']:17.3f} {final['best_response_nll']:18.3f}")


if __name__ == "__main__":
    main()
