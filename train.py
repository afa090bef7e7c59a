"""Train a binary spiking network: `python train.py optimizer=tbso dataset=digits engine.T=4`.

Configs live in configs/ (one group per axis: dataset, model, optimizer, engine, logger, ...);
`python train.py --help` lists them. Returns the final test top-1 accuracy (for Hydra sweepers).
Evaluate a saved model with eval.py. Exit status (bso.cli.run): 0 done, 1 refused or failed (one
`error:` line; HYDRA_FULL_ERROR=1 shows the traceback), 3 diverged, 130 interrupted (resume it as
the log says).
"""

import hydra
from omegaconf import DictConfig

from bso.cli import check_command_line, run


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    check_command_line("train")
    main()
