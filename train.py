"""Train a binary spiking network: `python train.py optimizer=tbso dataset=digits engine.T=4`.

Configs live in configs/ (one group per axis: dataset, model, optimizer, engine, logger, ...);
`python train.py --help` lists them. Returns the final test top-1 accuracy (for Hydra sweepers).

Exit status: 0 done (or, with resume=auto, already done), 1 refused or failed (one `error:` line;
HYDRA_FULL_ERROR=1 shows the traceback), 3 diverged, 130 interrupted (resume it as the log says).
"""

import sys

import hydra
from omegaconf import DictConfig

from bso.train import RunDiverged, RunInterrupted, train, user_error


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg).get("test/acc1", float("nan"))  # nan: a skipped job without records
    except (RunInterrupted, KeyboardInterrupt):  # the run logged how to resume it
        sys.exit(130)
    except RunDiverged:  # the run logged where (status.json: diverged)
        sys.exit(3)
    except Exception as err:
        if not user_error(err):
            raise
        sys.exit(1)  # user_error logged it (once, on rank 0 under torchrun)


if __name__ == "__main__":
    main()
