"""StableHLO: fold BatchNorms of JAX programs (``jax.export.Exported``) and StableHLO text.

The third graph adapter on :mod:`bnfold.core.pipeline`. JAX and jaxlib are an extra
(``bnfold[jax]``) imported only here, when a StableHLO model arrives. The IR is read and
rewritten through the MLIR Python bindings jaxlib ships (``jaxlib.mlir`` with the stablehlo
dialect): :mod:`.mlir` opens and writes modules, :mod:`.ops` reads ops, :mod:`.constants`
evaluates constant subexpressions, :mod:`.adapter` is the adapter, :mod:`.fold` the model
frontend, :mod:`.run` runs modules for verification and :mod:`.files` is the file frontend.
"""
