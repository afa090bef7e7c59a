from bso.engine.common import evaluate, input_at, instantaneous_loss
from bso.engine.online import OnlineEngine

__all__ = ["OnlineEngine", "evaluate", "input_at", "instantaneous_loss"]
