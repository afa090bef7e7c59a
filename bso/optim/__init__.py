from bso.optim.binary import BSO, TBSO, BinaryOptimizer
from bso.optim.router import OptimizerRouter, PlainOptimizer, build_optimizer, build_router

__all__ = [
    "BSO",
    "TBSO",
    "BinaryOptimizer",
    "OptimizerRouter",
    "PlainOptimizer",
    "build_optimizer",
    "build_router",
]
