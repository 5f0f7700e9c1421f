"""The multi-task methods of the DB-MTL paper's comparison, one module each."""

from dbmtl_jax.methods.registry import METHOD_GROUPS, METHODS, STATIC_ARGS, get_factory, get_method

__all__ = ["METHOD_GROUPS", "METHODS", "STATIC_ARGS", "get_factory", "get_method"]
