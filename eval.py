"""Evaluate a saved model on the test set: `python eval.py checkpoint=outputs/runs/<run>` (its best.pt).

The model, T and dataset are the checkpoint's own (configs/eval.yaml says what the command line may
change); a 1-bit export (best_1bit.pt) evaluates the same. Writes outputs/evals/<date>_<time>_<6 hex>/
and returns the test top-1 accuracy. Exit status as train.py's (bso.cli.run): 0 done, 1 refused or
failed (one `error:` line, e.g. a checkpoint that does not fit the model), 130 interrupted.
"""

import hydra
from omegaconf import DictConfig

from bso.cli import check_command_line, run
from bso.train import evaluate_checkpoint


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> float:
    return run(cfg, evaluate_checkpoint)


if __name__ == "__main__":
    check_command_line("eval")
    main()
