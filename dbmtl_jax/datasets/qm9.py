"""QM9 (Ramakrishnan et al., Scientific Data 2014) as the DB-MTL paper's 11-task graph regression benchmark.

Source: the PyPI package ``qm9pack==1.0.3`` (``pip install qm9pack==1.0.3``),
which ships all 130,831 converged QM9 molecules (the 133,885 of QM9 less the
3,054 that failed its consistency check, the same set as PyTorch Geometric's
``QM9``) as ``qm9pack/data/qm9_part{1,2,3}.csv``: element list, B3LYP
coordinates (Å), SMILES and every property.  The files are located through
``importlib.metadata`` and read with the ``csv`` module; ``qm9pack`` itself is
never imported (its ``__init__`` needs ``pkg_resources``, gone from current
setuptools).  Nothing is downloaded.

Tasks (order of the paper's Table 3, = PyG target indices 0, 1, 2, 3, 5, 6, 12,
13, 14, 15, 11 used by Nash-MTL and LibMTL).  ``y`` is stored in PyG's units;
multiply an MAE by ``metric_scale`` to get the paper's units (LibMTL's
``QM9Metric(scale=1000)`` for the eV targets; Table 3 lists values such as
HOMO 58.82 and U0 63.69 for STL, i.e. meV):

==========  ===========================================  =============  ===========  ============
name        QM9 column (qm9pack)                         unit of ``y``  metric_scale paper unit
==========  ===========================================  =============  ===========  ============
``mu``      Dipole_debye                                 D              1            D
``alpha``   Polarizability_bohr3                         a0^3           1            a0^3
``homo``    HOMO_au x 27.211386246                       eV             1000         meV
``lumo``    LUMO_au x 27.211386246                       eV             1000         meV
``r2``      R2_bohr2                                     a0^2           1            a0^2
``zpve``    ZPVE_au x 27.211386246                       eV             1000         meV
``u0``      (InternalEnergy_0K_au - atomref U0) x Ha2eV  eV             1000         meV
``u298``    (InternalEnergy_298K_au - atomref U)         eV             1000         meV
``h298``    (Enthalphy_298K_au - atomref H)              eV             1000         meV
``g298``    (GibbsFreeEnergy_298K_au - atomref G)        eV             1000         meV
``cv``      Heatcapacity_Cv_cal_mol_K                    cal/(mol K)    1            cal/(mol K)
==========  ===========================================  =============  ===========  ============

U0, U, H, G are atomization energies: the molecule's total energy less the sum
of its atoms' reference energies, :data:`ATOMREF_HARTREE` (B3LYP/6-31G(2df,p)
free-atom energies of H, C, N, O, F from the QM9 ``atomref`` table, Ramakrishnan
et al. 2014, figshare item 1057643; the same values PyG's ``QM9.atomref``
holds in eV).  Hartree to eV: 27.211386246 (PyG's ``HAR2EV``).

Graphs (one per molecule, atoms in the order of the XYZ coordinates, hydrogens
included):

* node features (11, PyG's layout): one-hot H, C, N, O, F; atomic number;
  aromatic; one-hot sp, sp2, sp3; number of bonded hydrogens;
* bonds: the SMILES graph (RDKit, with explicit hydrogens) is matched onto a
  distance graph of the coordinates (atoms bonded when closer than 1.2 x the
  sum of covalent radii, then 0.45 Å more than that sum if no match; radii H
  0.31, C 0.76, N 0.71, O 0.66, F 0.57 Å, Cordero et al. 2008), which gives the
  bond orders, aromaticity and hybridisation of the atoms at their coordinates
  (sanitised RDKit perception: aromatic rings are flagged, unlike PyG, which
  reads the kekulised SDF without sanitising); edge features: one-hot single,
  double, triple, aromatic; the batch functions append the interatomic distance
  (Å), as Nash-MTL's ``T.Distance(norm=False)``;
* if RDKit is not installed (``pip install rdkit``), or a molecule's SMILES
  cannot be matched (2 of 130,831 with RDKit 2026.09: the strained cages
  with QM9 ids 133857 and 133859), bonds come
  from the 1.2 x radii distance rule, bond-type one-hots are all zero and the
  aromatic / hybridisation features are 0 (``featurizer="coordinates"``;
  ``bond_orders_known`` marks each molecule).

Split (``seed`` 0): a random permutation; the first 10,000 molecules are the
test split, the next 10,000 the validation split, the other 110,831 training
(Nash-MTL / LibMTL keep the 831 extra in training; so does this loader).  With
``limit`` the sizes become ``min(10000, M // 13)``.  Standardisation statistics
(``y_mean``, ``y_std``) come from the training split only (LibMTL and Nash-MTL
use the whole data set: a negligible difference).

Processing all molecules takes about 4 minutes with RDKit on two busy cores
(tqdm shows the progress) and is cached as ``.npz`` (about 130 MB; the
integer-valued features are stored as uint8) under the cache directory
(``$DBMTL_JAX_CACHE``, else ``$XDG_CACHE_HOME/dbmtl_jax``, else
``~/.cache/dbmtl_jax``); ``limit=`` processes only the first molecules.  The
cache key holds the options, the RDKit version and the source files' names and
sizes, plus, for files given with ``path=``, their sha256 (an edited copy is
processed again).

Batches are dicts of padded NumPy arrays in the jraph convention (the last
node and the last graph of every batch are padding, so segment sums need no
masks): ``node_features [N, 11]``, ``positions [N, 3]``, ``edge_index [2, E]``
(``edge_index[0]`` source, ``[1]`` target), ``edge_features [E, 5]``,
``node_graph [N]``, ``node_mask``, ``edge_mask``, ``graph_mask``, ``n_node``,
``n_edge``, ``targets [G, 11]`` (standardised) and ``targets_raw``;
:func:`to_graph_batch` turns one into the :class:`dbmtl_jax.architectures.GraphBatch`
that the MPNN encoder takes.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from dbmtl_jax.datasets._cache import (artefact_path, file_digest, load_artefact, package_file, save_artefact,
                                       unavailable)
from dbmtl_jax.datasets._checks import check_int
from dbmtl_jax.datasets.adult import TaskInfo

__all__ = [
    "ATOMREF_HARTREE",
    "HARTREE_TO_EV",
    "QM9Data",
    "QM9_PACKAGE",
    "QM9_TASKS",
    "featurize_molecule",
    "load_qm9",
    "process_qm9_rows",
    "read_qm9_csv",
    "to_graph_batch",
]

QM9_PACKAGE = "qm9pack==1.0.3"
QM9_MEMBERS = tuple(f"qm9pack/data/qm9_part{i}.csv" for i in (1, 2, 3))
_VERSION = 2
HARTREE_TO_EV = 27.211386246
# Free-atom reference energies (Hartree) for U0, U(298.15 K), H(298.15 K), G(298.15 K): QM9 atomref table.
ATOMREF_HARTREE: dict[int, tuple[float, float, float, float]] = {
    1: (-0.500273, -0.498857, -0.497912, -0.510927),
    6: (-37.846772, -37.845355, -37.844411, -37.861317),
    7: (-54.583861, -54.582445, -54.581501, -54.598897),
    8: (-75.064579, -75.063163, -75.062219, -75.079532),
    9: (-99.718730, -99.717314, -99.716370, -99.733544),
}
ELEMENTS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
_ONEHOT = {1: 0, 6: 1, 7: 2, 8: 3, 9: 4}
COVALENT_RADII = {1: 0.31, 6: 0.76, 7: 0.71, 8: 0.66, 9: 0.57}  # Å, Cordero et al. (2008)
NODE_FEATURES: tuple[str, ...] = ("H", "C", "N", "O", "F", "atomic_number", "aromatic", "sp", "sp2", "sp3", "num_h")
BOND_TYPES: tuple[str, ...] = ("single", "double", "triple", "aromatic")

# (name, column, conversion to the unit of y, atomref column or None, unit, metric_scale, paper unit)
_TARGETS: tuple[tuple[str, str, float, Optional[int], str, float, str], ...] = (
    ("mu", "Dipole_debye", 1.0, None, "D", 1.0, "D"),
    ("alpha", "Polarizability_bohr3", 1.0, None, "a0^3", 1.0, "a0^3"),
    ("homo", "HOMO_au", HARTREE_TO_EV, None, "eV", 1000.0, "meV"),
    ("lumo", "LUMO_au", HARTREE_TO_EV, None, "eV", 1000.0, "meV"),
    ("r2", "R2_bohr2", 1.0, None, "a0^2", 1.0, "a0^2"),
    ("zpve", "ZPVE_au", HARTREE_TO_EV, None, "eV", 1000.0, "meV"),
    ("u0", "InternalEnergy_0K_au", HARTREE_TO_EV, 0, "eV", 1000.0, "meV"),
    ("u298", "InternalEnergy_298K_au", HARTREE_TO_EV, 1, "eV", 1000.0, "meV"),
    ("h298", "Enthalphy_298K_au", HARTREE_TO_EV, 2, "eV", 1000.0, "meV"),
    ("g298", "GibbsFreeEnergy_298K_au", HARTREE_TO_EV, 3, "eV", 1000.0, "meV"),
    ("cv", "Heatcapacity_Cv_cal_mol_K", 1.0, None, "cal/(mol K)", 1.0, "cal/(mol K)"),
)
QM9_TASKS: tuple[TaskInfo, ...] = tuple(TaskInfo(t[0], "mse", "mae", False, t[4]) for t in _TARGETS)
REQUIRED_COLUMNS: tuple[str, ...] = ("Index", "SMILES", "Elements", "XYZ_Ang") + tuple(t[1] for t in _TARGETS)
_HOW = (
    f"QM9 is read from the PyPI package qm9pack (all 130,831 molecules):\n"
    f"  {sys.executable} -m pip install {QM9_PACKAGE}\n"
    "(only its CSV files are read; for bond orders, aromaticity and hybridisation also: pip install rdkit).\n"
    "Or pass load_qm9(path=...) a directory holding qm9_part*.csv files with qm9pack's columns."
)


# --------------------------------------------------------------------------- reading


def _part_order(f: Path) -> tuple:
    """Sort key of ``qm9_part<N>.csv`` files by their number, so ``part10`` follows ``part9`` (a name sort
    would read it second); a part name without a number sorts after the numbered ones, by name."""
    m = re.fullmatch(r"qm9_part(\d+)\.csv", f.name)
    return (0, int(m.group(1)), f.name) if m else (1, 0, f.name)


def _source_files(path: Optional[Union[str, os.PathLike]]) -> list[Path]:
    if path is None:
        files = [package_file("qm9pack", m) for m in QM9_MEMBERS]
        if any(f is None for f in files):
            raise unavailable("QM9", "the package qm9pack (with its data files) is not installed.", _HOW)
        return [Path(f) for f in files]  # type: ignore[arg-type]
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(p.glob("qm9_part*.csv"), key=_part_order)
        if files:
            return files
        raise unavailable("QM9", f"{p} holds no qm9_part*.csv file.", _HOW)
    raise unavailable("QM9", f"{p} does not exist.", _HOW)


def _floats(text: str) -> np.ndarray:
    """Numbers of a bracketed list such as ``[[0.1,0.,1.],[2*^-6,...]]`` (Mathematica ``*^`` exponents)."""
    body = text.replace("[", " ").replace("]", " ").replace("*^", "e").replace(",", " ")
    return np.asarray(body.split(), dtype=np.float64)


def _elements(text: str) -> list[str]:
    return [e.strip().strip("'\"") for e in text.strip().strip("[]").split(",") if e.strip()]


def read_qm9_csv(files: Sequence[Union[str, os.PathLike]], limit: Optional[int] = None) -> Iterator[dict[str, Any]]:
    """Yields one parsed molecule per row: ``index``, ``smiles``, ``z`` (int64 ``[n]``), ``pos``
    (float64 ``[n, 3]``, Å) and each column of :data:`REQUIRED_COLUMNS` as a float.

    Raises a ValueError naming the file and line for an empty file, a malformed row, a molecule
    without atoms, a non-finite coordinate or property, or a molecule ``Index`` read before (a
    duplicated molecule could land in two splits)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    count = 0
    seen: dict[int, str] = {}
    for path in files:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path} is empty (not even a header row); is it a complete qm9pack CSV?")
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise ValueError(f"{path} lacks the column(s) {missing}; is it a qm9pack CSV?")
            col = {c: header.index(c) for c in REQUIRED_COLUMNS}
            for line, row in enumerate(reader, 2):
                if limit is not None and count >= limit:
                    return
                try:
                    names = _elements(row[col["Elements"]])
                    z = np.asarray([ELEMENTS[e] for e in names], dtype=np.int64)
                    pos = _floats(row[col["XYZ_Ang"]]).reshape(len(z), 3)
                    mol = {"index": int(row[col["Index"]]), "smiles": row[col["SMILES"]].strip(), "z": z, "pos": pos}
                    for t in _TARGETS:
                        mol[t[1]] = float(row[col[t[1]]].replace("*^", "e"))
                except (KeyError, ValueError, IndexError) as e:
                    raise ValueError(f"{path}:{line}: malformed QM9 row ({e}).") from e
                where = f"{path}:{line}"
                if len(z) == 0:
                    raise ValueError(f"{where}: malformed QM9 row (molecule {mol['index']} has no atoms).")
                bad = [] if np.all(np.isfinite(pos)) else ["XYZ_Ang"]
                bad += [t[1] for t in _TARGETS if not np.isfinite(mol[t[1]])]
                if bad:
                    raise ValueError(f"{where}: molecule {mol['index']} has non-finite values in {bad}.")
                if mol["index"] in seen:
                    raise ValueError(f"{where}: molecule Index {mol['index']} was already read at {seen[mol['index']]} "
                                     "(a duplicated molecule would sit in more than one split).")
                seen[mol["index"]] = where
                count += 1
                yield mol


def targets_from_row(mol: dict[str, Any]) -> np.ndarray:
    """The 11 targets of a parsed row in the units of ``y`` (atomization energies for U0, U, H, G)."""
    out = np.empty(len(_TARGETS), np.float64)
    for k, (_, column, conv, ref, *_rest) in enumerate(_TARGETS):
        v = mol[column]
        if ref is not None:
            v -= sum(ATOMREF_HARTREE[int(a)][ref] for a in mol["z"])
        out[k] = v * conv
    return out


# --------------------------------------------------------------------------- featurisation


def _rdkit() -> Any:
    try:
        from rdkit import Chem, RDLogger  # type: ignore
    except ImportError:
        return None
    RDLogger.DisableLog("rdApp.*")
    return Chem


def _distance_bonds(z: np.ndarray, pos: np.ndarray, factor: float, slack: float) -> np.ndarray:
    """Pairs ``i < j`` closer than ``factor * (r_i + r_j) + slack``; int64 ``[b, 2]``."""
    r = np.asarray([COVALENT_RADII[int(a)] for a in z])
    d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    adj = np.triu(d < factor * (r[:, None] + r[None, :]) + slack, k=1)
    return np.argwhere(adj)


def _rdkit_match(chem: Any, z: np.ndarray, pos: np.ndarray, smiles: str) -> Optional[tuple]:
    """Maps the SMILES molecule (explicit H) onto the coordinates; returns (aromatic, hybrid, bonds, types) or None."""
    tmpl = chem.MolFromSmiles(smiles)
    if tmpl is None:
        return None
    tmpl = chem.AddHs(tmpl)
    if tmpl.GetNumAtoms() != len(z):
        return None
    query = chem.RWMol(tmpl)
    chem.Kekulize(query, clearAromaticFlags=True)
    for b in query.GetBonds():
        b.SetBondType(chem.BondType.SINGLE)
    for a in query.GetAtoms():
        a.SetFormalCharge(0)
        a.SetNoImplicit(True)
    query = query.GetMol()
    query.UpdatePropertyCache(strict=False)
    match = None
    for factor, slack in ((1.2, 0.0), (1.0, 0.45)):
        g = chem.RWMol()
        for a in z:
            atom = chem.Atom(int(a))
            atom.SetNoImplicit(True)
            g.AddAtom(atom)
        for i, j in _distance_bonds(z, pos, factor, slack):
            g.AddBond(int(i), int(j), chem.BondType.SINGLE)
        g = g.GetMol()
        g.UpdatePropertyCache(strict=False)
        chem.FastFindRings(g)
        match = g.GetSubstructMatch(query)
        if match:
            break
    if not match:
        return None
    hyb = {chem.HybridizationType.SP: 0, chem.HybridizationType.SP2: 1, chem.HybridizationType.SP3: 2}
    btype = {chem.BondType.SINGLE: 0, chem.BondType.DOUBLE: 1, chem.BondType.TRIPLE: 2, chem.BondType.AROMATIC: 3}
    aromatic = np.zeros(len(z), np.float32)
    hybrid = np.full(len(z), -1, np.int64)
    for a in tmpl.GetAtoms():
        k = match[a.GetIdx()]
        aromatic[k] = float(a.GetIsAromatic())
        hybrid[k] = hyb.get(a.GetHybridization(), -1)
    bonds, types = [], []
    for b in tmpl.GetBonds():
        i, j = match[b.GetBeginAtomIdx()], match[b.GetEndAtomIdx()]
        bonds.append((min(i, j), max(i, j)))
        types.append(btype.get(b.GetBondType(), -1))
    return aromatic, hybrid, np.asarray(bonds, np.int64).reshape(-1, 2), np.asarray(types, np.int64)


def featurize_molecule(z: np.ndarray, pos: np.ndarray, smiles: str, chem: Any = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Node features ``[n, 11]``, directed edges ``[2, 2b]`` (local indices, sorted) with bond
    one-hots ``[2b, 4]``, and whether bond orders come from RDKit (``chem`` = ``rdkit.Chem`` or None)."""
    z = np.asarray(z, np.int64)
    n = len(z)
    got = _rdkit_match(chem, z, pos, smiles) if chem is not None else None
    if got is None:
        aromatic, hybrid = np.zeros(n, np.float32), np.full(n, -1, np.int64)
        bonds = _distance_bonds(z, pos, 1.2, 0.0)
        types = np.full(len(bonds), -1, np.int64)
    else:
        aromatic, hybrid, bonds, types = got
    x = np.zeros((n, len(NODE_FEATURES)), np.float32)
    x[np.arange(n), [_ONEHOT[int(a)] for a in z]] = 1.0
    x[:, 5] = z
    x[:, 6] = aromatic
    ok = hybrid >= 0
    x[np.nonzero(ok)[0], 7 + hybrid[ok]] = 1.0
    src = np.concatenate([bonds[:, 0], bonds[:, 1]])
    dst = np.concatenate([bonds[:, 1], bonds[:, 0]])
    t = np.concatenate([types, types])
    np.add.at(x[:, 10], src, (z[dst] == 1).astype(np.float32))
    order = np.lexsort((dst, src))
    src, dst, t = src[order], dst[order], t[order]
    attr = np.zeros((len(t), len(BOND_TYPES)), np.float32)
    attr[np.nonzero(t >= 0)[0], t[t >= 0]] = 1.0
    return x, np.stack([src, dst]).astype(np.int64), attr, got is not None


def process_qm9_rows(rows: Any, chem: Any = None, progress: bool = False, total: Optional[int] = None
                     ) -> dict[str, np.ndarray]:
    """Featurises parsed rows (see :func:`read_qm9_csv`) into concatenated CSR-style arrays."""
    if progress:
        try:
            from tqdm.auto import tqdm

            rows = tqdm(rows, total=total, desc="QM9 molecules", unit="mol")
        except ImportError:
            pass
    xs, poss, zs, eis, eas, ys, idx, known = [], [], [], [], [], [], [], []
    for mol in rows:
        x, ei, ea, ok = featurize_molecule(mol["z"], mol["pos"], mol["smiles"], chem)
        xs.append(x)
        poss.append(mol["pos"].astype(np.float32))
        zs.append(mol["z"].astype(np.int8))
        eis.append(ei.astype(np.int32))
        eas.append(ea)
        ys.append(targets_from_row(mol))
        idx.append(mol["index"])
        known.append(ok)
    if not xs:
        raise ValueError("no QM9 molecule was read.")
    n_node = np.asarray([len(x) for x in xs], np.int64)
    n_edge = np.asarray([e.shape[1] for e in eis], np.int64)
    return {
        "node_features": np.concatenate(xs),
        "positions": np.concatenate(poss),
        "atomic_numbers": np.concatenate(zs),
        "node_ptr": np.concatenate([[0], np.cumsum(n_node)]),
        "edge_index": np.concatenate(eis, axis=1),
        "edge_features": np.concatenate(eas),
        "edge_ptr": np.concatenate([[0], np.cumsum(n_edge)]),
        "y": np.stack(ys),
        "qm9_index": np.asarray(idx, np.int64),
        "bond_orders_known": np.asarray(known, bool),
    }


# --------------------------------------------------------------------------- data set


@dataclasses.dataclass(frozen=True)
class QM9Data:
    """Featurised QM9 graphs (CSR-style concatenation) with splits and target statistics.

    Molecule ``m`` owns nodes ``node_ptr[m]:node_ptr[m+1]`` and edges
    ``edge_ptr[m]:edge_ptr[m+1]``; ``edge_index`` holds *local* node indices.

    Attributes:
      node_features: float32 ``[N_total, 11]`` (:data:`NODE_FEATURES`).
      positions: float32 ``[N_total, 3]`` (Å).
      atomic_numbers: int8 ``[N_total]``.
      node_ptr, edge_ptr: int64 ``[M + 1]`` offsets.
      edge_index: int32 ``[2, E_total]`` (both directions of every bond).
      edge_features: float32 ``[E_total, 4]`` bond-type one-hot (:data:`BOND_TYPES`).
      y: float64 ``[M, 11]`` targets in the units of ``tasks[t].unit``.
      y_mean, y_std: float64 ``[11]`` training-split statistics.
      train_idx, val_idx, test_idx: int64 molecule indices.
      tasks: :data:`QM9_TASKS`.
      metric_scale: float64 ``[11]``: MAE x scale is in ``metric_units`` (the paper's).
      metric_units: the paper's unit of each task.
      qm9_index: the QM9 molecule id (1..133885).
      bond_orders_known: bool ``[M]``: bonds and their orders from RDKit (else distance rule).
      featurizer: ``"rdkit"`` or ``"coordinates"``.
    """

    node_features: np.ndarray
    positions: np.ndarray
    atomic_numbers: np.ndarray
    node_ptr: np.ndarray
    edge_index: np.ndarray
    edge_features: np.ndarray
    edge_ptr: np.ndarray
    y: np.ndarray
    y_mean: np.ndarray
    y_std: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    tasks: tuple[TaskInfo, ...]
    metric_scale: np.ndarray
    metric_units: tuple[str, ...]
    qm9_index: np.ndarray
    bond_orders_known: np.ndarray
    featurizer: str

    @property
    def num_molecules(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def n_node(self) -> np.ndarray:
        """Atoms per molecule, int64 ``[M]``."""
        return np.diff(self.node_ptr)

    @property
    def n_bond_edges(self) -> np.ndarray:
        """Directed bond edges per molecule, int64 ``[M]``."""
        return np.diff(self.edge_ptr)

    def split_indices(self, split: str) -> np.ndarray:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}.")
        return getattr(self, f"{split}_idx")

    def standardize(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, np.float64) - self.y_mean) / self.y_std

    def destandardize(self, y: np.ndarray) -> np.ndarray:
        return np.asarray(y, np.float64) * self.y_std + self.y_mean

    def num_edges(self, indices: np.ndarray, complete: bool = False) -> np.ndarray:
        """Edges per molecule in a batch: bond edges, or ``n (n - 1)`` for the complete graph."""
        indices = np.asarray(indices, np.int64)
        if complete:
            n = self.n_node[indices]
            return n * (n - 1)
        return self.n_bond_edges[indices]

    def graph_batch(self, indices: Sequence[int], max_nodes: int, max_edges: int, max_graphs: Optional[int] = None,
                    complete: bool = False) -> dict[str, np.ndarray]:
        """One padded batch of the molecules ``indices`` (see the module docstring for the keys).

        Needs ``max_nodes >= atoms + 1``, ``max_edges >= edges`` and ``max_graphs >= len(indices) + 1``
        (default ``len(indices) + 1``): the last node and graph are padding; padding edges join
        the last node to itself.  ``complete=True`` uses every ordered atom pair ``i != j`` as an
        edge (bond one-hots zero for non-bonded pairs), as Nash-MTL's ``Complete`` transform.
        """
        idx = np.asarray(indices, np.int64).reshape(-1)
        g = len(idx) + 1 if max_graphs is None else int(max_graphs)
        n_node = self.n_node[idx]
        n_edge = self.num_edges(idx, complete)
        if g < len(idx) + 1 or max_nodes < n_node.sum() + 1 or max_edges < n_edge.sum():
            raise ValueError(
                f"batch of {len(idx)} molecules ({n_node.sum()} atoms, {n_edge.sum()} edges) does not fit "
                f"max_graphs={g} (needs >= {len(idx) + 1}), max_nodes={max_nodes} (needs >= {n_node.sum() + 1}), "
                f"max_edges={max_edges} (needs >= {n_edge.sum()})."
            )
        nf = np.zeros((max_nodes, self.node_features.shape[1]), np.float32)
        pos = np.zeros((max_nodes, 3), np.float32)
        node_graph = np.full(max_nodes, g - 1, np.int32)
        ei = np.full((2, max_edges), max_nodes - 1, np.int32)
        ef = np.zeros((max_edges, len(BOND_TYPES) + 1), np.float32)
        node_off = np.concatenate([[0], np.cumsum(n_node)])
        edge_off = np.concatenate([[0], np.cumsum(n_edge)])
        for k, m in enumerate(idx):
            a, b = self.node_ptr[m], self.node_ptr[m + 1]
            n, o = b - a, node_off[k]
            nf[o:o + n] = self.node_features[a:b]
            pos[o:o + n] = self.positions[a:b]
            node_graph[o:o + n] = k
            local = self.edge_index[:, self.edge_ptr[m]:self.edge_ptr[m + 1]].astype(np.int64)
            attr = self.edge_features[self.edge_ptr[m]:self.edge_ptr[m + 1]]
            if complete:
                src, dst = np.nonzero(~np.eye(n, dtype=bool))
                dense = np.zeros((n, n, attr.shape[1]), np.float32)
                dense[local[0], local[1]] = attr
                attr, local = dense[src, dst], np.stack([src, dst])
            e0 = edge_off[k]
            ne = local.shape[1]
            ei[:, e0:e0 + ne] = local + o
            ef[e0:e0 + ne, :-1] = attr
        n_real_e = int(edge_off[-1])
        d = pos[ei[0, :n_real_e]] - pos[ei[1, :n_real_e]]
        ef[:n_real_e, -1] = np.sqrt(np.sum(d * d, axis=1))
        y = np.zeros((g, self.num_tasks), np.float64)
        y[:len(idx)] = self.y[idx]
        ystd = np.zeros_like(y)
        ystd[:len(idx)] = self.standardize(self.y[idx])
        counts_n = np.zeros(g, np.int32)
        counts_e = np.zeros(g, np.int32)
        counts_n[:len(idx)], counts_e[:len(idx)] = n_node, n_edge
        counts_n[-1] = max_nodes - int(node_off[-1])
        counts_e[-1] = max_edges - n_real_e
        return {
            "node_features": nf,
            "positions": pos,
            "edge_index": ei,
            "edge_features": ef,
            "node_graph": node_graph,
            "node_mask": np.arange(max_nodes) < node_off[-1],
            "edge_mask": np.arange(max_edges) < n_real_e,
            "graph_mask": np.arange(g) < len(idx),
            "n_node": counts_n,
            "n_edge": counts_e,
            "targets": ystd.astype(np.float32),
            "targets_raw": y.astype(np.float32),
            "molecule_index": np.concatenate([idx, np.full(g - len(idx), -1, np.int64)]),
        }

    def batch_budget(self, split: str, batch_size: int, complete: bool = False) -> tuple[int, int]:
        """``(max_nodes, max_edges)`` that fit *any* ``batch_size`` molecules of ``split``."""
        idx = self.split_indices(split)
        k = min(batch_size, len(idx))
        nodes = np.sort(self.n_node[idx])[::-1][:k].sum() + 1
        edges = np.sort(self.num_edges(idx, complete))[::-1][:k].sum()
        return int(nodes), int(max(edges, 1))

    def iterate_batches(self, split: str, batch_size: int, *, max_nodes: Optional[int] = None,
                        max_edges: Optional[int] = None, complete: bool = False, shuffle: bool = False,
                        seed: int = 0, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Padded batches of ``split`` with fixed shapes (``max_graphs = batch_size + 1``).

        Without ``max_nodes`` / ``max_edges`` the budgets of :meth:`batch_budget` are used, so
        every batch holds ``batch_size`` molecules (the last one fewer).  With smaller budgets
        molecules are packed greedily in order: a batch closes when the next molecule would not fit.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        idx = self.split_indices(split)
        if shuffle:
            idx = np.random.default_rng(seed).permutation(idx)
        bn, be = self.batch_budget(split, batch_size, complete)
        max_nodes = bn if max_nodes is None else int(max_nodes)
        max_edges = be if max_edges is None else int(max_edges)
        nn, ne = self.n_node[idx], self.num_edges(idx, complete)
        start = 0
        while start < len(idx):
            stop, used_n, used_e = start, 0, 0
            while (stop < len(idx) and stop - start < batch_size and used_n + nn[stop] + 1 <= max_nodes
                   and used_e + ne[stop] <= max_edges):
                used_n += nn[stop]
                used_e += ne[stop]
                stop += 1
            if stop == start:
                raise ValueError(f"molecule {idx[start]} ({nn[start]} atoms, {ne[start]} edges) does not fit "
                                 f"max_nodes={max_nodes} (one node is padding), max_edges={max_edges}.")
            if drop_last and stop - start < batch_size and stop == len(idx):
                return
            yield self.graph_batch(idx[start:stop], max_nodes, max_edges, batch_size + 1, complete)
            start = stop


def to_graph_batch(batch: dict[str, np.ndarray]) -> Any:
    """A batch dict of :meth:`QM9Data.graph_batch` as :class:`dbmtl_jax.architectures.GraphBatch`
    (same padding convention; needs Flax, which ``dbmtl_jax.architectures`` uses)."""
    from dbmtl_jax.architectures.mpnn import GraphBatch

    return GraphBatch(
        node_features=batch["node_features"], edge_index=batch["edge_index"], edge_features=batch["edge_features"],
        node_graph=batch["node_graph"], num_graphs=int(batch["graph_mask"].shape[0]), node_mask=batch["node_mask"],
        edge_mask=batch["edge_mask"], graph_mask=batch["graph_mask"],
    )


def _split(m: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(m)
    k = min(10000, m // 13)
    return np.sort(perm[2 * k:]), np.sort(perm[k:2 * k]), np.sort(perm[:k])


def load_qm9(
    path: Optional[Union[str, os.PathLike]] = None,
    *,
    limit: Optional[int] = None,
    seed: int = 0,
    featurizer: str = "auto",
    cache: bool = True,
    progress: bool = True,
) -> QM9Data:
    """Loads (processing and caching on first use) QM9 as 11 regression tasks; see the module docstring.

    Args:
      path: ``None``: the CSVs of the installed ``qm9pack==1.0.3``; else a qm9pack-style CSV file or
        a directory of ``qm9_part*.csv`` files.
      limit: process only the first ``limit`` molecules (file order; quick runs); an int >= 1 or None.
      seed: seed of the random train / val / test split.
      featurizer: ``"auto"`` (RDKit if installed, else coordinates), ``"rdkit"`` (required) or
        ``"coordinates"`` (no RDKit: distance bonds, no bond orders / aromaticity / hybridisation).
      cache: read / write the processed arrays as ``.npz`` in the cache directory.
      progress: show a tqdm progress bar while processing.

    Raises:
      DatasetUnavailableError: qm9pack (or the given files) is missing, or ``featurizer="rdkit"``
        without RDKit; the message says what to install.
    """
    if featurizer not in ("auto", "rdkit", "coordinates"):
        raise ValueError(f"featurizer must be 'auto', 'rdkit' or 'coordinates', got {featurizer!r}.")
    if limit is not None:  # True read one molecule, 2.5 three (each under a cache key of its own)
        limit = check_int("limit", limit)
    files = _source_files(path)
    chem = None if featurizer == "coordinates" else _rdkit()
    if featurizer == "rdkit" and chem is None:
        raise unavailable("QM9", "featurizer='rdkit' but RDKit is not installed.", "  pip install rdkit")
    if featurizer == "auto" and chem is None:
        warnings.warn("RDKit is not installed (pip install rdkit): QM9 graphs use distance bonds without bond "
                      "orders, aromaticity or hybridisation.", stacklevel=2)
    used = "rdkit" if chem is not None else "coordinates"
    version = ""
    if chem is not None:
        from rdkit import __version__ as version  # type: ignore
    # The installed qm9pack files never change, so name and size identify them; a user's files may be edited
    # in place or differ from another copy of the same size, so their content digest is part of the key.
    key = {"version": _VERSION, "limit": limit, "featurizer": used, "rdkit": version,
           "files": [(f.name, f.stat().st_size) if path is None else (f.name, f.stat().st_size, file_digest(f))
                     for f in files]}
    target = artefact_path("qm9", key)
    arrays = load_artefact(target) if cache else None
    if arrays is None:
        total = limit if limit is not None else (130831 if path is None else None)
        arrays = process_qm9_rows(read_qm9_csv(files, limit), chem, progress=progress, total=total)
        if cache:  # the features are small integers (one-hots, Z <= 9, H count <= 4): uint8 is lossless
            save_artefact(target, dict(arrays, node_features=arrays["node_features"].astype(np.uint8),
                                       edge_features=arrays["edge_features"].astype(np.uint8)))
    y = arrays["y"].astype(np.float64)
    train, val, test = _split(len(y), seed)
    mean = y[train].mean(axis=0) if len(train) else np.zeros(y.shape[1])
    std = y[train].std(axis=0) if len(train) else np.ones(y.shape[1])
    std = np.where(std > 0, std, 1.0)
    return QM9Data(
        node_features=arrays["node_features"].astype(np.float32),
        positions=arrays["positions"],
        atomic_numbers=arrays["atomic_numbers"],
        node_ptr=arrays["node_ptr"],
        edge_index=arrays["edge_index"],
        edge_features=arrays["edge_features"].astype(np.float32),
        edge_ptr=arrays["edge_ptr"],
        y=y,
        y_mean=mean,
        y_std=std,
        train_idx=train,
        val_idx=val,
        test_idx=test,
        tasks=QM9_TASKS,
        metric_scale=np.asarray([t[5] for t in _TARGETS]),
        metric_units=tuple(t[6] for t in _TARGETS),
        qm9_index=arrays["qm9_index"],
        bond_orders_known=arrays["bond_orders_known"],
        featurizer=used,
    )
