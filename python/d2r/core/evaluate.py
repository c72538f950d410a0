"""Retrieval evaluation: the Revisited Oxford / Paris protocol (Radenovic et al., CVPR 2018).

The metrics reproduce the reference evaluation code (``revisitop``, ``python/evaluate.py``):

* ``compute_ap`` -- the trapezoidal average precision of ``revisitop.compute_ap``;
* ``compute_map`` -- ``revisitop.compute_map`` (same argument layout: ``ranks`` is
  ``(n_database, n_queries)``, ``gnd`` entries carry ``'ok'`` and ``'junk'``), vectorised;
* ``revisited`` -- the public entry point: rankings as ``(n_queries, n_database)`` and the
  Revisited ground truth (``'easy'``, ``'hard'``, ``'junk'``), evaluated under the three protocols

  ======  ===============  =====================
  name    positives        ignored (junk)
  ======  ===============  =====================
  easy    easy             junk + hard
  medium  easy + hard      junk
  hard    hard             junk + easy
  ======  ===============  =====================

Ignored images are removed from the ranking before any metric is computed. mP@k caps k at the
(1-based, junk-removed) rank of the query's last positive, ``min(max_pos_rank, k)``, as revisitop
does; mR@k is the fraction of the query's positives within the first k (junk-removed) results.
Queries without positives get NaN and are left out of the means.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["PROTOCOLS", "compute_ap", "compute_map", "format_table", "revisited"]

#: The Revisited protocols, in the order results are reported.
PROTOCOLS = ("easy", "medium", "hard")


# ----------------------------------------------------------------------------------------------
# Core metrics
# ----------------------------------------------------------------------------------------------

def compute_ap(ranks: ArrayLike, n_positives: Any) -> float:
    """Average precision by the trapezoidal rule, exactly as ``revisitop.compute_ap``.

    ``ranks``: 0-based positions of the positives in the ranking after junk removal, sorted
    ascending (positives that were not retrieved are simply absent). ``n_positives``: the number
    of positives of the query (> 0). For the j-th retrieved positive (0-based) at rank r::

        precision_0 = j / r if r > 0 else 1
        precision_1 = (j + 1) / (r + 1)
        AP += (precision_0 + precision_1) / 2 / n_positives
    """
    r = np.asarray(ranks)
    if r.ndim != 1:
        r = r.reshape(-1)
    if r.size and not (np.issubdtype(r.dtype, np.integer) or np.issubdtype(r.dtype, np.floating)):
        raise ValueError(f"ranks must be numeric, got dtype {r.dtype}")
    r = r.astype(np.float64, copy=False)
    if r.size and (not np.isfinite(r).all() or r.min() < 0):
        raise ValueError("ranks must be finite and non-negative")
    try:
        n_pos = float(n_positives)
    except (TypeError, ValueError):
        n_pos = float("nan")
    if isinstance(n_positives, bool) or not np.isfinite(n_pos) or n_pos <= 0:
        raise ValueError(f"n_positives must be a positive number, got {n_positives!r}")
    if r.size == 0:
        return 0.0
    j = np.arange(r.size, dtype=np.float64)
    p0 = np.ones_like(r)
    np.divide(j, r, out=p0, where=r > 0)
    p1 = (j + 1.0) / (r + 1.0)
    return float(np.sum(p0 + p1) / (2.0 * n_pos))


def _query_metrics(pos: NDArray[np.int64], junk: NDArray[np.int64], n_pos: int, kappas: NDArray[np.int64]
                   ) -> tuple[float, NDArray[np.float64], NDArray[np.float64]]:
    """AP, precision@kappas (capped), recall@kappas of one query.

    ``pos`` and ``junk``: sorted 0-based positions in the ranking *before* junk removal.
    Each positive moves up by the number of junk images strictly before it (revisitop's loop)."""
    if junk.size:
        pos = pos - np.searchsorted(junk, pos, side="left")
    ap = compute_ap(pos, n_pos)
    if pos.size == 0:  # revisitop would fail here (max of an empty array); score it as a miss
        z = np.zeros(kappas.size)
        return ap, z, z.copy()
    pos1 = pos + 1  # 1-based
    kq = np.minimum(pos1.max(), kappas)
    prec = (pos1[None, :] <= kq[:, None]).sum(axis=1) / kq
    rec = (pos1[None, :] <= kappas[:, None]).sum(axis=1) / float(n_pos)
    return ap, prec.astype(np.float64), rec.astype(np.float64)


def _as_kappas(kappas: Iterable[Any]) -> NDArray[np.int64]:
    k = np.asarray(list(kappas) if not isinstance(kappas, np.ndarray) else kappas)
    if k.size == 0:
        return np.zeros(0, dtype=np.int64)
    if k.ndim != 1 or not np.issubdtype(k.dtype, np.integer) or (k < 1).any():
        raise ValueError(f"kappas must be a sequence of positive integers, got {kappas!r}")
    return k.astype(np.int64)


def _id_array(values: Any, name: str) -> NDArray[np.int64]:
    a = np.asarray(values if values is not None else [])
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if a.ndim != 1:
        a = a.reshape(-1)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer database indices, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _as_gnd_list(gnd: Any) -> list[Any]:
    if isinstance(gnd, (str, bytes, dict)):
        raise ValueError("gnd must be a sequence of per-query dicts")
    try:
        return list(gnd)
    except TypeError as exc:
        raise ValueError(f"gnd must be a sequence of per-query dicts, got {type(gnd).__name__}") from exc


def compute_map(ranks: ArrayLike, gnd: Any, kappas: Iterable[Any] = (1, 5, 10)
                ) -> tuple[float, NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """``revisitop.compute_map``: returns ``(map, aps, pr, prs)``.

    ``ranks``: ``(n_database, n_queries)`` integer array, column i the ranking of query i (this is
    revisitop's layout, the transpose of :func:`revisited`'s). ``gnd[i]['ok']``: positives
    (if absent, ``easy + hard``), ``gnd[i].get('junk')``: ignored images. As in revisitop,
    ``n_positives = len(ok)`` (entries not found in the ranking still count), a position that is
    both positive and junk counts as a positive, and queries with an empty ``ok`` get NaN in
    ``aps`` / ``prs`` and are left out of ``map`` and ``pr`` (NaN when every query is empty).
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be 2-D (n_database, n_queries), got shape {ranks.shape}")
    if ranks.size and not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be integer database indices, got dtype {ranks.dtype}")
    gnd = _as_gnd_list(gnd)
    nq = len(gnd)
    if ranks.shape[1] != nq:
        raise ValueError(f"ranks has {ranks.shape[1]} columns (queries) but gnd has {nq} entries")
    kap = _as_kappas(kappas)
    aps = np.full(nq, np.nan)
    prs = np.full((nq, kap.size), np.nan)
    for i, g in enumerate(gnd):
        if not isinstance(g, dict):
            raise ValueError(f"gnd[{i}] must be a dict, got {type(g).__name__}")
        if "ok" in g:
            ok = _id_array(g["ok"], f"gnd[{i}]['ok']")
        else:
            ok = np.concatenate([_id_array(g.get("easy"), f"gnd[{i}]['easy']"),
                                 _id_array(g.get("hard"), f"gnd[{i}]['hard']")])
        if ok.size == 0:
            continue
        junk_ids = _id_array(g.get("junk"), f"gnd[{i}]['junk']")
        col = ranks[:, i]
        pos = np.flatnonzero(np.isin(col, ok))
        junk = np.flatnonzero(np.isin(col, junk_ids)) if junk_ids.size else pos[:0]
        aps[i], prs[i], _ = _query_metrics(pos, junk, ok.size, kap)
    valid = ~np.isnan(aps)
    n_valid = int(valid.sum())
    if n_valid == 0:
        return float("nan"), aps, np.full(kap.size, np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _validate_ranks(ranks: ArrayLike, n_queries: int) -> NDArray[Any]:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be a 2-D (n_queries, n_database) array of database indices, "
                         f"got shape {ranks.shape}")
    if ranks.shape[0] != n_queries:
        raise ValueError(f"ranks has {ranks.shape[0]} rows (queries) but gnd has {n_queries} "
                         f"entries; ranks must be (n_queries, n_database)")
    if ranks.size and not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must hold integer database indices, got dtype {ranks.dtype}")
    n_db = ranks.shape[1]
    if ranks.size:
        lo, hi = int(ranks.min()), int(ranks.max())
        if lo < 0 or hi >= n_db:
            raise ValueError(f"ranks hold database indices outside [0, {n_db}) (min {lo}, max {hi}); "
                             f"each row must be a permutation of range(n_database)")
    return ranks


def _parse_gnd_entry(g: Any, i: int, n_db: int
                     ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.int64] | None]:
    """(easy, hard, junk, ok_only) as sorted unique int64 arrays; ok_only is set for old-style
    entries that carry only 'ok' (those count for the Medium protocol only)."""
    if not isinstance(g, dict):
        raise ValueError(f"gnd[{i}] must be a dict with 'easy', 'hard', 'junk' lists, "
                         f"got {type(g).__name__}")
    arrs: dict[str, NDArray[np.int64]] = {}
    for key in ("easy", "hard", "junk", "ok"):
        a = _id_array(g.get(key), f"gnd[{i}][{key!r}]")
        if a.size and (a.min() < 0 or a.max() >= n_db):
            raise ValueError(f"gnd[{i}][{key!r}] holds indices outside [0, {n_db}) "
                             f"(min {int(a.min())}, max {int(a.max())})")
        arrs[key] = np.unique(a)
    easy, hard, junk, ok = arrs["easy"], arrs["hard"], arrs["junk"], arrs["ok"]
    if "ok" not in g:
        return easy, hard, junk, None
    if "easy" in g or "hard" in g:
        if not np.array_equal(ok, np.union1d(easy, hard)):
            raise ValueError(f"gnd[{i}]['ok'] is not the union of 'easy' and 'hard'")
        return easy, hard, junk, None
    return easy, hard, junk, ok  # old-style entry: Medium only


def revisited(ranks: ArrayLike, gnd: Any, kappas: Iterable[Any] = (1, 5, 10)) -> dict[str, dict[str, Any]]:
    """Evaluate rankings under the Revisited Oxford / Paris protocols.

    Parameters
    ----------
    ranks : integer array (n_queries, n_database)
        Row q is the full ranking of query q: database indices, best first. Every row must be a
        permutation of ``range(n_database)``.
    gnd : sequence of dicts, one per query
        ``'easy'``, ``'hard'``, ``'junk'``: lists of database indices (a missing key is empty).
        Old-style entries with only ``'ok'`` (= easy + hard) count for the Medium protocol only;
        ``'ok'`` alongside ``'easy'`` / ``'hard'`` must equal their union. The revisitop config
        dict (with a ``'gnd'`` key) is accepted too.
    kappas : sequence of positive ints
        The k of mP@k and mR@k.

    Returns
    -------
    dict
        ``{"easy": r, "medium": r, "hard": r}`` where each ``r`` has ``"map"`` (mean AP, 0-1, NaN when
        no query has positives), ``"mp"`` and ``"mr"`` (mean precision / recall at each kappa),
        ``"aps"`` (per-query AP, NaN for queries without positives), ``"prs"`` and ``"rs"``
        (per-query precision / recall at each kappa, NaN rows likewise), ``"n_queries"`` (queries
        with positives) and ``"kappas"``. Ignored images of a protocol are removed from the ranking;
        an index that is both positive and ignored counts as positive.
    """
    if isinstance(gnd, dict):
        if "gnd" not in gnd:
            raise ValueError("gnd must be a list of per-query dicts (or a config dict with 'gnd')")
        gnd = gnd["gnd"]
    gnd = _as_gnd_list(gnd)
    nq = len(gnd)
    ranks = _validate_ranks(ranks, nq)
    n_db = ranks.shape[1]
    kap = _as_kappas(kappas)

    out = {p: {"aps": np.full(nq, np.nan), "prs": np.full((nq, kap.size), np.nan),
               "rs": np.full((nq, kap.size), np.nan)} for p in PROTOCOLS}
    parsed = [_parse_gnd_entry(g, i, n_db) for i, g in enumerate(gnd)]

    inv = np.empty(n_db, dtype=np.int64)          # inverse permutation: position of each index
    positions = np.arange(n_db, dtype=np.int64)
    for q in range(nq):
        # Every row is checked, also those of queries without positives: indices are in range
        # and the row has n_db entries, so it is a permutation iff every slot gets filled.
        inv.fill(-1)
        inv[ranks[q]] = positions
        if n_db and inv.min() < 0:
            missing = int(np.flatnonzero(inv < 0)[0])
            raise ValueError(f"ranks[{q}] is not a permutation of range({n_db}): index {missing} "
                             f"is missing (another appears more than once)")
        easy, hard, junk, ok_only = parsed[q]
        if ok_only is not None:
            settings = {"medium": (ok_only, junk)}
        else:
            settings = {"easy": (easy, np.union1d(junk, hard)),
                        "medium": (np.union1d(easy, hard), junk),
                        "hard": (hard, np.union1d(junk, easy))}
        for proto, (p_ids, j_ids) in settings.items():
            if p_ids.size == 0:
                continue
            j_ids = np.setdiff1d(j_ids, p_ids, assume_unique=True)
            pos = np.sort(inv[p_ids])
            jpos = np.sort(inv[j_ids])
            ap, prec, rec = _query_metrics(pos, jpos, p_ids.size, kap)
            r = out[proto]
            r["aps"][q], r["prs"][q], r["rs"][q] = ap, prec, rec

    results: dict[str, dict[str, Any]] = {}
    for proto in PROTOCOLS:
        r = out[proto]
        valid = ~np.isnan(r["aps"])
        n = int(valid.sum())
        if n:
            m, mp, mr = float(r["aps"][valid].mean()), r["prs"][valid].mean(0), r["rs"][valid].mean(0)
        else:
            m, mp, mr = float("nan"), np.full(kap.size, np.nan), np.full(kap.size, np.nan)
        results[proto] = {"map": m, "mp": mp, "mr": mr, "aps": r["aps"], "prs": r["prs"],
                          "rs": r["rs"], "n_queries": n, "kappas": tuple(int(k) for k in kap)}
    return results


def _pct(x: Any) -> str:
    return "   nan" if x is None or not np.isfinite(x) else f"{100.0 * float(x):6.2f}"


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A short text table of :func:`revisited` results: mAP, mP@k and mR@k in %, one row per
    protocol, and a one-line ``mAP E / M / H`` summary."""
    protos = [p for p in PROTOCOLS if p in results] + [p for p in results if p not in PROTOCOLS]
    if not protos:
        return "(no results)"
    kappas = tuple(results[protos[0]].get("kappas", ()))
    if not kappas:
        kappas = tuple(range(1, len(np.atleast_1d(results[protos[0]].get("mp", []))) + 1))
    head = f"{'protocol':<8} {'#q':>5} {'mAP':>6}" + "".join(f" {'mP@' + str(k):>6}" for k in kappas) \
        + "".join(f" {'mR@' + str(k):>6}" for k in kappas)
    lines = [head, "-" * len(head)]
    for p in protos:
        r = results[p]
        mp = np.atleast_1d(r.get("mp", np.full(len(kappas), np.nan)))
        mr = np.atleast_1d(r.get("mr", np.full(len(kappas), np.nan)))
        lines.append(f"{p:<8} {int(r.get('n_queries', 0)):>5} {_pct(r.get('map'))}"
                     + "".join(f" {_pct(v)}" for v in mp) + "".join(f" {_pct(v)}" for v in mr))
    summary = " / ".join(_pct(results[p].get("map")).strip() for p in protos)
    letters = "/".join(p[0].upper() for p in protos)
    lines.append(f"mAP {letters}: {summary}")
    return "\n".join(lines)
