"""The algorithm-description library every service shares: mechanisms, proposals, and the code generator.

An algorithm is described as one mechanism per family slot plus hyperparameters (`mechanisms.py`); a proposal
carries such a description (`proposals.py`); `codegen.py` compiles it into a candidate module of the shared
interface (docs/architecture.md, "The algorithm-description library").
"""
