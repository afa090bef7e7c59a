from bso.engine.bptt import BPTTEngine
from bso.engine.common import Engine, evaluate, input_at, instantaneous_loss
from bso.engine.online import OnlineEngine

__all__ = ["BPTTEngine", "Engine", "OnlineEngine", "evaluate", "input_at", "instantaneous_loss"]
