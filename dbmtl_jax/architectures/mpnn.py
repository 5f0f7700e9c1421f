"""A message-passing neural network (MPNN) for molecules, on padded graph batches.

Reference: J. Gilmer, S. S. Schoenholz, P. F. Riley, O. Vinyals, G. E. Dahl,
"Neural Message Passing for Quantum Chemistry", ICML 2017 (edge network
message function, GRU update, set2set readout).  Set2set: O. Vinyals,
S. Bengio, M. Kudlur, "Order Matters: Sequence to Sequence for Sets",
ICLR 2016.

Model (defaults from the PyTorch Geometric QM9 example that LibMTL's QM9
benchmark, used by DB-MTL, builds on: width 64, edge-network hidden 128,
3 message-passing steps, mean aggregation, set2set with 3 steps)::

    h_v^0     = ReLU(W_in x_v + b_in)
    A(e)      = MLP(e) reshaped to d×d                      (edge network, shared over steps)
    m_v^k     = ReLU(W_root h_v^k + b + AGG_{w→v} A(e_wv) h_w^k)   (AGG: mean or sum over incoming edges)
    h_v^{k+1} = GRU(h_v^k, m_v^k)                           (k = 0 … K−1, GRU shared over steps)
    r_G       = set2set({h_v^K : v ∈ G})  or  Σ_v h_v^K  or  mean_v h_v^K
    out_G     = ReLU(W_out r_G + b_out)                     (graph features for the per-target heads)

Graphs come as a :class:`GraphBatch`: all graphs' nodes and edges
concatenated, padded to fixed sizes, with masks, so the model jits once per
padded size.  Padding nodes, edges and graphs contribute nothing, whatever
their features (NaN included) and indices: their features are replaced by
zeros, messages along padding edges are dropped, padding nodes are excluded
from aggregation, degree counts and readout, and padding graphs' features are
zero.  A *real* edge whose sender or receiver lies outside ``[0, N)``, or a
real node whose graph id lies outside ``[0, G)``, is bad input: a
``ValueError`` when the arrays are concrete, an all-NaN output under ``jit``
(never a silent clip onto another node or graph).  Aggregations use
``jax.ops.segment_sum`` / ``segment_max``.

With :class:`~dbmtl_jax.architectures.HPS`, ``HPS(MPNN(...), [nnx.Linear(64, 1,
rngs=rngs) for _ in range(11)])`` is the QM9 model (11 regression targets).
"""

from __future__ import annotations

import operator
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["GraphBatch", "Graph", "pack_graphs", "MPNN", "Set2Set", "AGGREGATIONS", "READOUTS", "segment_softmax"]

AGGREGATIONS = ("mean", "sum")
READOUTS = ("set2set", "sum", "mean")


class GraphBatch(NamedTuple):
    """A batch of graphs as one padded graph.

    Attributes:
      node_features: ``[N, F]`` node features (all graphs' nodes concatenated).
      edge_index: ``[2, E]`` integer ``(senders, receivers)`` node indices;
        messages flow from sender to receiver (give both directions for an
        undirected bond).
      edge_features: ``[E, Fe]`` edge features.
      node_graph: ``[N]`` integer graph id of every node, in ``[0, num_graphs)``.
      num_graphs: the number of graph slots ``G`` (a static Python int: it is
        pytree metadata, not a leaf, so ``jax.jit`` sees it as a constant).
      node_mask: ``[N]`` bool, False for padding nodes (``None``: all real).
      edge_mask: ``[E]`` bool, False for padding edges (``None``: all real).
      graph_mask: ``[G]`` bool, False for padding graph slots (``None``: all real).
    """

    node_features: Any
    edge_index: Any
    edge_features: Any
    node_graph: Any
    num_graphs: int
    node_mask: Any = None
    edge_mask: Any = None
    graph_mask: Any = None


_LEAF_FIELDS = ("node_features", "edge_index", "edge_features", "node_graph", "node_mask", "edge_mask", "graph_mask")


def _static_num_graphs(g: GraphBatch) -> int:
    # operator.index, not int: a float count (1.7) must not be truncated into the jit-static metadata.
    try:
        return operator.index(g.num_graphs)
    except TypeError:
        raise ValueError(f"graph.num_graphs must be a static int, got {g.num_graphs!r}.") from None


def _graph_flatten_with_keys(g: GraphBatch) -> tuple:
    return tuple((jax.tree_util.GetAttrKey(f), getattr(g, f)) for f in _LEAF_FIELDS), _static_num_graphs(g)


def _graph_unflatten(num_graphs: int, children: Sequence[Any]) -> GraphBatch:
    kw = dict(zip(_LEAF_FIELDS, children))
    return GraphBatch(num_graphs=num_graphs, **kw)


jax.tree_util.register_pytree_with_keys(
    GraphBatch,
    _graph_flatten_with_keys,
    _graph_unflatten,
    flatten_func=lambda g: (tuple(getattr(g, f) for f in _LEAF_FIELDS), _static_num_graphs(g)),
)


class Graph(NamedTuple):
    """One small graph in NumPy: ``node_features [n, F]``, ``edge_index [2, e]``, ``edge_features [e, Fe]``."""

    node_features: np.ndarray
    edge_index: np.ndarray
    edge_features: np.ndarray


def _as_graph(g: Union[Graph, Mapping[str, Any], Sequence[Any]], i: int) -> Graph:
    if isinstance(g, Mapping):
        try:
            g = Graph(g["node_features"], g["edge_index"], g["edge_features"])
        except KeyError as e:
            raise ValueError(f"graph {i} is missing key {e.args[0]!r}.") from None
    elif not isinstance(g, Graph):
        if len(g) != 3:
            raise ValueError(f"graph {i} must be (node_features, edge_index, edge_features); got {len(g)} items.")
        g = Graph(*g)
    x = np.asarray(g.node_features)
    ei = np.asarray(g.edge_index)
    ef = np.asarray(g.edge_features)
    if x.ndim != 2:
        raise ValueError(f"graph {i}: node_features must be [n, F], got shape {x.shape}.")
    if ei.size == 0:
        ei = ei.reshape(2, 0)
    if ei.ndim != 2 or ei.shape[0] != 2:
        raise ValueError(f"graph {i}: edge_index must be [2, e], got shape {ei.shape}.")
    if not np.issubdtype(ei.dtype, np.integer):
        # Packing casts to int32, which would truncate 1.5 to node 1.
        if not np.issubdtype(ei.dtype, np.number) or not np.all(np.isfinite(ei) & (ei == np.round(ei))):
            raise ValueError(f"graph {i}: edge_index must hold integer node indices, got {ei.dtype} values.")
        ei = ei.astype(np.int64)
    if ef.ndim != 2 or ef.shape[0] != ei.shape[1]:
        raise ValueError(f"graph {i}: edge_features must be [e, Fe] with e = {ei.shape[1]}, got shape {ef.shape}.")
    if ei.size and (ei.min() < 0 or ei.max() >= x.shape[0]):
        raise ValueError(f"graph {i}: edge_index refers to nodes outside [0, {x.shape[0]}).")
    return Graph(x, ei, ef)


def pack_graphs(
    graphs: Sequence[Union[Graph, Mapping[str, Any], Sequence[Any]]],
    *,
    max_nodes: Optional[int] = None,
    max_edges: Optional[int] = None,
    max_graphs: Optional[int] = None,
    dtype: Any = np.float32,
) -> GraphBatch:
    """Packs small NumPy graphs into one padded :class:`GraphBatch` (NumPy arrays).

    Args:
      graphs: each a :class:`Graph`, a mapping with the same keys, or a tuple
        ``(node_features, edge_index, edge_features)`` with node-local edge
        indices.
      max_nodes, max_edges, max_graphs: padded sizes ``N``, ``E``, ``G``
        (default: the actual totals, i.e. no padding).  Keep them fixed across
        batches so that a jitted model compiles once.
      dtype: floating dtype of the features.

    Padding nodes have zero features and graph id ``G − 1``; padding edges join
    the last node to itself; both are masked out.
    """
    gs = [_as_graph(g, i) for i, g in enumerate(graphs)]
    if not gs:
        raise ValueError("graphs is empty.")
    f = gs[0].node_features.shape[1]
    fe = gs[0].edge_features.shape[1]
    for i, g in enumerate(gs):
        if g.node_features.shape[1] != f or g.edge_features.shape[1] != fe:
            raise ValueError(f"graph {i} has feature widths ({g.node_features.shape[1]}, {g.edge_features.shape[1]}); "
                             f"graph 0 has ({f}, {fe}).")
    n_tot = sum(g.node_features.shape[0] for g in gs)
    e_tot = sum(g.edge_index.shape[1] for g in gs)
    n = n_tot if max_nodes is None else int(max_nodes)
    e = e_tot if max_edges is None else int(max_edges)
    ng = len(gs) if max_graphs is None else int(max_graphs)
    if n < n_tot or e < e_tot or ng < len(gs) or n < 1:
        raise ValueError(
            f"padded sizes (max_nodes={n}, max_edges={e}, max_graphs={ng}) are smaller than the batch "
            f"({n_tot} nodes, {e_tot} edges, {len(gs)} graphs)."
        )
    x = np.zeros((n, f), dtype)
    ef = np.zeros((e, fe), dtype)
    ei = np.full((2, e), n - 1, np.int32)
    node_graph = np.full((n,), ng - 1, np.int32)
    node_mask = np.zeros((n,), bool)
    edge_mask = np.zeros((e,), bool)
    graph_mask = np.zeros((ng,), bool)
    no = eo = 0
    for gi, g in enumerate(gs):
        k, m = g.node_features.shape[0], g.edge_index.shape[1]
        x[no : no + k] = g.node_features
        node_graph[no : no + k] = gi
        node_mask[no : no + k] = True
        ei[:, eo : eo + m] = g.edge_index + no
        ef[eo : eo + m] = g.edge_features
        edge_mask[eo : eo + m] = True
        graph_mask[gi] = True
        no, eo = no + k, eo + m
    return GraphBatch(x, ei, ef, node_graph, ng, node_mask, edge_mask, graph_mask)


def _mask(mask: Any, size: int, name: str = "mask") -> jax.Array:
    if mask is None:
        return jnp.ones((size,), bool)
    if tuple(jnp.shape(mask)) != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(jnp.shape(mask))}.")
    return jnp.asarray(mask, bool)


def _check_graph_shapes(graph: GraphBatch) -> tuple[int, int]:
    """``(N, E)`` of ``graph``; raises ``ValueError`` naming the field whose shape does not fit."""
    xs, eis = tuple(jnp.shape(graph.node_features)), tuple(jnp.shape(graph.edge_index))
    efs, ngs = tuple(jnp.shape(graph.edge_features)), tuple(jnp.shape(graph.node_graph))
    if len(xs) != 2:
        raise ValueError(f"node_features must be [N, F], got shape {xs}.")
    if len(eis) != 2 or eis[0] != 2:
        raise ValueError(f"edge_index must be [2, E] (senders; receivers), got shape {eis}.")
    n, e = xs[0], eis[1]
    if len(efs) != 2 or efs[0] != e:
        raise ValueError(f"edge_features must be [E, Fe] with E = {e} (edge_index's), got shape {efs}.")
    if ngs != (n,):
        raise ValueError(f"node_graph must have shape ({n},), got {ngs}.")
    return n, e


def _out_of_range(ids: jax.Array, real: jax.Array, size: int, what: str) -> jax.Array:
    """Whether a real entry of ``ids`` lies outside ``[0, size)``; raises ``ValueError`` for concrete inputs."""
    bad = real & ((ids < 0) | (ids >= size))
    if not isinstance(bad, jax.core.Tracer) and bool(jnp.any(bad)):
        k = int(jnp.argmax(bad))
        raise ValueError(f"{what} {int(ids[k])} at position {k} is outside [0, {size}) and not masked as padding.")
    return jnp.any(bad)


def segment_softmax(logits: jax.Array, segment_ids: jax.Array, mask: jax.Array, num_segments: int) -> jax.Array:
    """Softmax of ``logits [N]`` within each segment, over unmasked entries (masked entries get 0)."""
    acc = jnp.promote_types(logits.dtype, jnp.float32)
    z = jnp.where(mask, logits.astype(acc), -jnp.inf)
    zmax = jax.ops.segment_max(z, segment_ids, num_segments=num_segments)
    zmax = jax.lax.stop_gradient(jnp.where(jnp.isfinite(zmax), zmax, 0.0))  # softmax is shift-invariant
    ex = jnp.where(mask, jnp.exp(z - zmax[segment_ids]), 0.0)
    den = jax.ops.segment_sum(ex, segment_ids, num_segments=num_segments)
    return ex / jnp.maximum(den[segment_ids], jnp.finfo(acc).tiny)


class Set2Set(nnx.Module):
    """Set2set readout (Vinyals et al., ICLR 2016): ``steps`` LSTM-attention rounds, output ``[G, 2d]``."""

    def __init__(self, features: int, *, steps: int = 3, rngs: nnx.Rngs):
        if int(steps) < 1:
            raise ValueError(f"set2set steps must be >= 1, got {steps!r} (0 steps give an all-zero readout).")
        self.lstm = nnx.LSTMCell(2 * int(features), int(features), rngs=rngs)
        self.features = int(features)
        self.steps = int(steps)

    def __call__(self, h: jax.Array, graph_ids: jax.Array, node_mask: jax.Array, num_graphs: int) -> jax.Array:
        d = self.features
        q_star = jnp.zeros((num_graphs, 2 * d), h.dtype)
        carry = (jnp.zeros((num_graphs, d), h.dtype), jnp.zeros((num_graphs, d), h.dtype))
        for _ in range(self.steps):
            carry, q = self.lstm(carry, q_star)
            scores = jnp.sum(h * q[graph_ids], axis=-1)
            a = segment_softmax(scores, graph_ids, node_mask, num_graphs).astype(h.dtype)
            r = jax.ops.segment_sum(a[:, None] * h, graph_ids, num_segments=num_graphs)
            q_star = jnp.concatenate([q, r], axis=-1)
        return q_star


class MPNN(nnx.Module):
    """Edge-network MPNN with GRU updates (Gilmer et al., ICML 2017) giving graph-level features.

    Args:
      node_features: ``F``, the input node feature width (11 for PyG's QM9).
      edge_features: ``Fe``, the edge feature width (4 for PyG's QM9 bond types).
      dim: hidden width ``d`` (default 64).
      edge_hidden: hidden width of the edge network ``Fe → edge_hidden → d²`` (default 128).
      steps: message-passing steps ``K`` (default 3).
      aggregation: ``"mean"`` (default, PyG ``NNConv(aggr="mean")``) or
        ``"sum"`` (Gilmer et al.'s sum of messages).
      readout: ``"set2set"`` (default, Gilmer et al.), ``"sum"`` or ``"mean"``.
      set2set_steps: set2set processing steps (default 3).
      out_features: width of the output features (default ``dim``); ``None``
        with ``project=False`` returns the readout itself.
      project: apply ``ReLU(dense(·))`` after the readout (default True).
      rngs: ``nnx.Rngs``.

    ``__call__(graph: GraphBatch) -> [G, out_features]`` (zero rows for padding
    graph slots); :meth:`node_states` gives the ``[N, d]`` node states.  Array
    shapes are checked (a ``ValueError`` names the field), and so are the
    indices of real edges and nodes (see the module docstring).
    """

    def __init__(
        self,
        node_features: int,
        edge_features: int,
        *,
        dim: int = 64,
        edge_hidden: int = 128,
        steps: int = 3,
        aggregation: str = "mean",
        readout: str = "set2set",
        set2set_steps: int = 3,
        out_features: Optional[int] = None,
        project: bool = True,
        rngs: nnx.Rngs,
    ):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}.")
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; expected one of {READOUTS}.")
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps!r}.")
        if not project and out_features is not None:
            raise ValueError(f"out_features={out_features!r} needs project=True (without the projection the output "
                             "is the readout itself).")
        d = int(dim)
        self.embed = nnx.Linear(int(node_features), d, rngs=rngs)
        self.edge_net = nnx.Sequential(
            nnx.Linear(int(edge_features), int(edge_hidden), rngs=rngs), jax.nn.relu,
            nnx.Linear(int(edge_hidden), d * d, rngs=rngs),
        )
        self.root = nnx.Linear(d, d, rngs=rngs)
        self.gru = nnx.GRUCell(d, d, rngs=rngs)
        self.set2set = Set2Set(d, steps=set2set_steps, rngs=rngs) if readout == "set2set" else None
        r = 2 * d if readout == "set2set" else d
        if project:
            self.out = nnx.Linear(r, d if out_features is None else int(out_features), rngs=rngs)
            self.out_features = d if out_features is None else int(out_features)
        else:
            self.out = None
            self.out_features = r
        self.dim, self.steps, self.aggregation, self.readout = d, int(steps), aggregation, readout

    def node_states(self, graph: GraphBatch) -> jax.Array:
        """The node states ``h^K`` ``[N, d]`` (zero for padding nodes)."""
        h, bad = self._node_states(graph)
        return jnp.where(bad, jnp.nan, h)

    def _node_states(self, graph: GraphBatch) -> tuple[jax.Array, jax.Array]:
        """``(h^K, bad)``: the node states and whether a real edge has an end outside ``[0, N)``."""
        n, e = _check_graph_shapes(graph)
        node_mask = _mask(graph.node_mask, n, "node_mask")
        edge_mask = _mask(graph.edge_mask, e, "edge_mask")
        ei = jnp.asarray(graph.edge_index, jnp.int32)
        bad = _out_of_range(ei[0], edge_mask, n, "edge_index: sender") | _out_of_range(
            ei[1], edge_mask, n, "edge_index: receiver")
        senders = jnp.clip(ei[0], 0, n - 1)  # padding edges may hold any index
        receivers = jnp.clip(ei[1], 0, n - 1)
        # An edge carries a message only if it and both its ends are real.
        em = edge_mask & node_mask[senders] & node_mask[receivers]
        # Padding features are replaced (not multiplied) by zeros: NaN · 0 would still be NaN.
        x = jnp.asarray(graph.node_features)
        x = jnp.where(node_mask[:, None], x, jnp.zeros((), x.dtype))
        ef = jnp.asarray(graph.edge_features)
        ef = jnp.where(em[:, None], ef, jnp.zeros((), ef.dtype))
        nm = node_mask[:, None].astype(x.dtype)
        h = jax.nn.relu(self.embed(x)) * nm
        a = self.edge_net(ef).reshape(e, self.dim, self.dim)
        emf = em[:, None].astype(h.dtype)
        if self.aggregation == "mean":
            deg = jax.ops.segment_sum(em.astype(h.dtype), receivers, num_segments=n)
            inv_deg = 1.0 / jnp.maximum(deg, 1.0)
        for _ in range(self.steps):
            msg = jnp.einsum("eij,ej->ei", a, h[senders]) * emf
            agg = jax.ops.segment_sum(msg, receivers, num_segments=n)
            if self.aggregation == "mean":
                agg = agg * inv_deg[:, None]
            m = jax.nn.relu(self.root(h) + agg)
            h, _ = self.gru(h, m)
            h = h * nm
        return h, bad

    def __call__(self, graph: GraphBatch) -> jax.Array:
        """Graph-level features ``[G, out_features]``."""
        g = graph.num_graphs
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
            raise ValueError(f"graph.num_graphs must be a positive static int, got {g!r}.")
        g = int(g)
        h, bad_edges = self._node_states(graph)
        n = h.shape[0]
        node_mask = _mask(graph.node_mask, n, "node_mask")
        graph_mask = _mask(graph.graph_mask, g, f"graph_mask (num_graphs = {g})")
        gid = jnp.asarray(graph.node_graph, jnp.int32)
        bad = bad_edges | _out_of_range(gid, node_mask, g, "node_graph: graph id")
        gid = jnp.clip(gid, 0, g - 1)  # padding nodes may hold any id
        if self.readout == "set2set":
            r = self.set2set(h, gid, node_mask, g)
        else:
            r = jax.ops.segment_sum(h * node_mask[:, None].astype(h.dtype), gid, num_segments=g)
            if self.readout == "mean":
                cnt = jax.ops.segment_sum(node_mask.astype(h.dtype), gid, num_segments=g)
                r = r / jnp.maximum(cnt, 1.0)[:, None]
        if self.out is not None:
            r = jax.nn.relu(self.out(r))
        return jnp.where(bad, jnp.nan, r * graph_mask[:, None].astype(r.dtype))
