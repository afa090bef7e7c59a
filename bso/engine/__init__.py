from bso.engine.bptt import BPTTEngine
from bso.engine.common import Engine, EpochTally, evaluate, input_at, instantaneous_loss
from bso.engine.online import OnlineEngine

__all__ = [
    "BPTTEngine",
    "Engine",
    "EpochTally",
    "OnlineEngine",
    "evaluate",
    "input_at",
    "instantaneous_loss",
]
