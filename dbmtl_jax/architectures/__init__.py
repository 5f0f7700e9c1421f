"""Multi-task architectures in Flax NNX.

* :class:`HPS` — hard parameter sharing (Caruana, ICML 1993): shared encoder,
  one head per task; the architecture of the DB-MTL experiments.
* :class:`CrossStitch` — cross-stitch networks (Misra et al., CVPR 2016).
* :class:`MTAN` — multi-task attention network (Liu et al., CVPR 2019), for
  conv backbones (:func:`mtan_conv`) and MLPs (:func:`mtan_mlp`).
* :class:`MPNN` — edge-network message passing with GRU updates (Gilmer et al.,
  ICML 2017) on padded :class:`GraphBatch` es built by :func:`pack_graphs`.
* Encoders and heads: :class:`MLPEncoder`, :class:`MLPHead`,
  :class:`LeNetEncoder`, :class:`ConvEncoderDecoder`, :class:`DenseHead`,
  :class:`ASPPHead`.

Every architecture exposes the ``shared=`` path predicate for the
gradient-balancing transforms (``HPS.is_shared``, ``CrossStitch.is_shared``,
``MTAN.is_shared``), matching the paths of ``nnx.split(model, nnx.Param)``.
Every model returns the tuple of its T task outputs.

Per-task gradients of a model with batch norm in training mode: differentiate
through ``nnx.merge(graphdef, params, rest, copy=True)`` (or pass
``nnx.as_pure(rest)``); merging the original ``rest`` Variables inside a JAX
transform makes Flax raise ``TraceContextError`` when batch norm updates its
statistics.  Statistics updated inside such a copy are discarded; run a plain
forward pass (or use ``model.eval()``) to maintain them.
"""

from dbmtl_jax.architectures._layers import NORMS, prefix_predicate
from dbmtl_jax.architectures.cross_stitch import CrossStitch, cross_stitch_shared, stitch_init
from dbmtl_jax.architectures.encoders import (
    ASPPHead,
    ConvEncoderDecoder,
    DenseHead,
    LeNetEncoder,
    MLPEncoder,
    MLPHead,
)
from dbmtl_jax.architectures.hps import HPS, hps_shared, hps_spec, hps_task_grads
from dbmtl_jax.architectures.mpnn import (
    AGGREGATIONS,
    MPNN,
    READOUTS,
    Graph,
    GraphBatch,
    Set2Set,
    pack_graphs,
    segment_softmax,
)
from dbmtl_jax.architectures.mtan import (
    MTAN,
    MTAN_KINDS,
    AttentionMask,
    ConvStage,
    mtan_conv,
    mtan_mlp,
    mtan_shared,
    mtan_shared_predicate,
)

__all__ = [
    "NORMS",
    "prefix_predicate",
    "HPS",
    "hps_shared",
    "hps_spec",
    "hps_task_grads",  # deprecated (0.2.0)
    "CrossStitch",
    "cross_stitch_shared",
    "stitch_init",
    "MTAN",
    "MTAN_KINDS",
    "AttentionMask",
    "ConvStage",
    "mtan_conv",
    "mtan_mlp",
    "mtan_shared",
    "mtan_shared_predicate",
    "MPNN",
    "Set2Set",
    "Graph",
    "GraphBatch",
    "pack_graphs",
    "segment_softmax",
    "AGGREGATIONS",
    "READOUTS",
    "MLPEncoder",
    "MLPHead",
    "LeNetEncoder",
    "ConvEncoderDecoder",
    "DenseHead",
    "ASPPHead",
]
