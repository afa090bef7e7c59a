from bso.optim.binary import BSO, TBSO, BinaryOptimizer
from bso.optim.router import OptimizerRouter, build_router

__all__ = ["BSO", "TBSO", "BinaryOptimizer", "OptimizerRouter", "build_router"]
