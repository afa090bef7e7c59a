"""Train a binary spiking network: `python train.py optimizer=tbso dataset=digits engine.T=4`.

Configs live in configs/ (one group per axis: dataset, model, optimizer, engine, logger, ...);
`python train.py --help` lists them. Returns the final test top-1 accuracy (for Hydra sweepers).
"""

import hydra
from omegaconf import DictConfig

from bso.train import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg)["test/acc1"]


if __name__ == "__main__":
    main()
