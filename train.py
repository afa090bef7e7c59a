"""Train a binary spiking network: `python train.py optimizer=tbso dataset=digits engine.T=4`.

Configs live in configs/ (one group per axis: dataset, model, optimizer, engine, logger, ...);
`python train.py --help` lists them. Returns the final test top-1 accuracy (for Hydra sweepers).
"""

import sys

import hydra
from omegaconf import DictConfig

from bso.train import RunInterrupted, train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)["test/acc1"]
    except (RunInterrupted, KeyboardInterrupt):  # the run logged how to resume it
        sys.exit(130)


if __name__ == "__main__":
    main()
