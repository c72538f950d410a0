"""The Revisited Oxford / Paris evaluation (d2r.evaluate): hand-computed APs, junk removal, the
mP@k cap, mR@k, skipped queries, and a cross-check against a literal transcription of revisitop's
compute_map (the independent reference below)."""
import numpy as np
import pytest

from d2r.core.evaluate import compute_ap, compute_map, format_table, revisited


# ----------------------------------------------------------------------------------------------
# Independent reference: revisitop python/evaluate.py (filipradenovic/revisitop), transcribed
# line by line. Only change: np.in1d (removed from NumPy 2.4) -> np.isin, same result for 1-D.
# ----------------------------------------------------------------------------------------------

def ref_compute_ap(ranks, nres):
    # number of images ranked by the system
    nimgranks = len(ranks)
    # accumulate trapezoids in PR-plot
    ap = 0
    recall_step = 1. / nres
    for j in np.arange(nimgranks):
        rank = ranks[j]
        if rank == 0:
            precision_0 = 1.
        else:
            precision_0 = float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.
    return ap


def ref_compute_map(ranks, gnd, kappas=[]):
    map = 0.
    nq = len(gnd)  # number of queries
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    nempty = 0

    for i in np.arange(nq):
        qgnd = np.array(gnd[i]['ok'])

        # no positive images, skip from the average
        if qgnd.shape[0] == 0:
            aps[i] = float('nan')
            prs[i, :] = float('nan')
            nempty += 1
            continue

        try:
            qgndj = np.array(gnd[i]['junk'])
        except KeyError:
            qgndj = np.empty(0)

        # sorted positions of positive and junk images (0 based)
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]

        k = 0
        ij = 0
        if len(junk):
            # decrease positions of positives based on the number of
            # junk images appearing before them
            ip = 0
            while (ip < len(pos)):
                while (ij < len(junk) and pos[ip] > junk[ij]):
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1

        # compute ap
        ap = ref_compute_ap(pos, len(qgnd))
        map = map + ap
        aps[i] = ap

        # compute precision @ k
        pos += 1  # get it to 1-based
        for j in np.arange(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]

    map = map / (nq - nempty)
    pr = pr / (nq - nempty)

    return map, aps, pr, prs


def ref_recall(ranks, gnd, kappas):
    """mR@k, written out directly: positives within the first k after junk removal / #positives."""
    out = []
    for i, g in enumerate(gnd):
        ok, junk = set(g['ok']), set(g.get('junk', []))
        if not ok:
            continue
        kept = [x for x in ranks[:, i] if x in ok or x not in junk]
        out.append([sum(x in ok for x in kept[:k]) / len(ok) for k in kappas])
    return np.mean(out, axis=0)


def protocol_gnd(gnd, protocol):
    """revisitop's own per-protocol setup (example_evaluate.py): ok / junk lists."""
    out = []
    for g in gnd:
        e, h, j = list(g.get('easy', [])), list(g.get('hard', [])), list(g.get('junk', []))
        if protocol == 'easy':
            out.append({'ok': e, 'junk': j + h})
        elif protocol == 'medium':
            out.append({'ok': e + h, 'junk': j})
        else:
            out.append({'ok': h, 'junk': j + e})
    return out


# ----------------------------------------------------------------------------------------------
# compute_ap by hand
# ----------------------------------------------------------------------------------------------

def test_ap_perfect():
    # positives at ranks 0, 1 of 2:  j=0,r=0: (1 + 1/1)/2 * 1/2 = 1/2 ; j=1,r=1: (1/1 + 2/2)/2 * 1/2 = 1/2
    assert compute_ap([0, 1], 2) == pytest.approx(1.0, abs=1e-15)
    assert compute_ap([0], 1) == pytest.approx(1.0, abs=1e-15)
    assert compute_ap(np.arange(50), 50) == pytest.approx(1.0, abs=1e-14)


def test_ap_known_ranks():
    # positives at ranks 1 and 3, n=2:
    #   j=0,r=1: p0 = 0/1 = 0,   p1 = 1/2  -> (0 + 1/2)/2 * 1/2   = 1/8
    #   j=1,r=3: p0 = 1/3,       p1 = 2/4  -> (1/3 + 1/2)/2 * 1/2 = 5/24
    #   AP = 3/24 + 5/24 = 1/3
    assert compute_ap([1, 3], 2) == pytest.approx(1 / 3, abs=1e-15)
    # one positive at rank 2: p0 = 0, p1 = 1/3 -> AP = 1/6
    assert compute_ap([2], 1) == pytest.approx(1 / 6, abs=1e-15)
    # a positive never retrieved still counts in n: rank 0 of 2 positives -> (1 + 1)/2 * 1/2 = 1/2
    assert compute_ap([0], 2) == pytest.approx(0.5, abs=1e-15)
    assert compute_ap([], 3) == 0.0


def test_ap_matches_reference_random():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        r = np.sort(rng.choice(200, size=int(rng.integers(0, n + 1)), replace=False))
        assert compute_ap(r, n) == pytest.approx(ref_compute_ap(r, n), rel=1e-12, abs=1e-15)


def test_ap_bad_inputs():
    with pytest.raises(ValueError):
        compute_ap([0, 1], 0)
    with pytest.raises(ValueError):
        compute_ap([-1], 1)
    with pytest.raises(ValueError):
        compute_ap([0], True)


# ----------------------------------------------------------------------------------------------
# revisited() by hand
# ----------------------------------------------------------------------------------------------

def one(ranking, gnd_entry, kappas=(1, 5, 10)):
    return revisited(np.asarray([ranking]), [gnd_entry], kappas)


def test_perfect_ranking():
    res = one([2, 0, 1, 3, 4], {'easy': [2, 0], 'hard': [1], 'junk': []})
    # easy: positives 2,0 at 0,1 (hard image 1 removed) -> AP 1; medium: 2,0,1 at 0,1,2 -> AP 1
    # hard: positive 1 at position 2, easy images 2,0 removed -> position 0 -> AP 1
    for p in ('easy', 'medium', 'hard'):
        assert res[p]['map'] == pytest.approx(1.0, abs=1e-15)
        assert res[p]['n_queries'] == 1
    # medium mP@k: 1-based ranks [1,2,3], cap at 3: k=1 -> 1/1, k=5 -> kq=3 -> 3/3, k=10 -> 3/3
    np.testing.assert_allclose(res['medium']['mp'], [1, 1, 1])
    # medium mR@k: k=1 -> 1/3, k=5 -> 3/3, k=10 -> 1
    np.testing.assert_allclose(res['medium']['mr'], [1 / 3, 1, 1])


def test_junk_before_and_between_positives():
    # ranking [J, P, J, N, P] -> after removing junk [P, N, P]: positives at 0, 2 (n=2)
    #   j=0,r=0: (1 + 1)/2 * 1/2 = 1/2
    #   j=1,r=2: (1/2 + 2/3)/2 * 1/2 = 7/24         AP = 12/24 + 7/24 = 19/24
    res = one([3, 1, 4, 0, 2], {'easy': [1, 2], 'junk': [3, 4]})
    assert res['easy']['map'] == pytest.approx(19 / 24, abs=1e-15)
    assert res['medium']['map'] == pytest.approx(19 / 24, abs=1e-15)
    assert np.isnan(res['hard']['map']) and res['hard']['n_queries'] == 0
    # mP@k: 1-based ranks [1, 3], last positive at 3:
    #   k=1: kq=1 -> 1/1 ; k=5: kq=min(3,5)=3 -> 2/3 ; k=10: kq=3 -> 2/3
    np.testing.assert_allclose(res['medium']['mp'], [1, 2 / 3, 2 / 3])
    # mR@k: k=1 -> 1/2 ; k=5 -> 2/2 ; k=10 -> 1
    np.testing.assert_allclose(res['medium']['mr'], [0.5, 1, 1])
    # without the junk list the junk counts as negatives: positives at 1, 4 ->
    #   j=0,r=1: (0 + 1/2)/2/2 = 1/8 ; j=1,r=4: (1/4 + 2/5)/2/2 = 13/80 -> AP = 23/80
    res2 = one([3, 1, 4, 0, 2], {'easy': [1, 2]})
    assert res2['medium']['map'] == pytest.approx(23 / 80, abs=1e-15)


def test_three_protocols_by_hand():
    # database 0..7, ranking (position: index) 0:3 1:0 2:5 3:1 4:7 5:2 6:6 7:4
    ranking = [3, 0, 5, 1, 7, 2, 6, 4]
    g = {'easy': [0, 2], 'hard': [5, 4], 'junk': [1]}
    res = one(ranking, g)
    # Easy: positives {0,2}, junk {1} + hard {5,4}; kept ranking [3,0,7,2,6]: positives at 1, 3
    #   j=0,r=1: (0 + 1/2)/2 * 1/2 = 1/8 ; j=1,r=3: (1/3 + 2/4)/2 * 1/2 = 5/24 -> AP = 1/3
    assert res['easy']['map'] == pytest.approx(1 / 3, abs=1e-15)
    # Medium: positives {0,2,5,4}, junk {1}; kept [3,0,5,7,2,6,4]: positives at 1, 2, 4, 6 (n=4)
    #   j=0,r=1: (0   + 1/2)/2 = 1/4      j=1,r=2: (1/2 + 2/3)/2 = 7/12
    #   j=2,r=4: (2/4 + 3/5)/2 = 11/20    j=3,r=6: (3/6 + 4/7)/2 = 15/28
    #   sum = (105 + 245 + 231 + 225)/420 = 806/420 ; AP = 806/420/4 = 403/840
    assert res['medium']['map'] == pytest.approx(403 / 840, abs=1e-15)
    # Hard: positives {5,4}, junk {1} + easy {0,2}; kept [3,5,7,6,4]: positives at 1, 4
    #   j=0,r=1: (0 + 1/2)/2 * 1/2 = 1/8 ; j=1,r=4: (1/4 + 2/5)/2 * 1/2 = 13/80 -> AP = 23/80
    assert res['hard']['map'] == pytest.approx(23 / 80, abs=1e-15)
    # Medium mP@k: 1-based [2,3,5,7], last positive at 7:
    #   k=1: kq=1 -> 0/1 ; k=5: kq=5 -> 3/5 ; k=10: kq=min(7,10)=7 -> 4/7
    np.testing.assert_allclose(res['medium']['mp'], [0, 3 / 5, 4 / 7])
    # Medium mR@k: k=1 -> 0/4 ; k=5 -> 3/4 ; k=10 -> 4/4
    np.testing.assert_allclose(res['medium']['mr'], [0, 3 / 4, 1])
    # Hard mP@k: 1-based [2,5]: k=1 -> 0 ; k=5 -> kq=5 -> 2/5 ; k=10 -> kq=5 -> 2/5
    np.testing.assert_allclose(res['hard']['mp'], [0, 2 / 5, 2 / 5])
    np.testing.assert_allclose(res['hard']['mr'], [0, 1, 1])
    # Easy mP@k: 1-based [2,4]: k=1 -> 0 ; k=5 -> kq=4 -> 2/4 ; k=10 -> 2/4
    np.testing.assert_allclose(res['easy']['mp'], [0, 0.5, 0.5])
    # 'ok' alongside easy/hard must be their union, and then changes nothing
    res_ok = one(ranking, dict(g, ok=[4, 0, 2, 5]))
    for p in ('easy', 'medium', 'hard'):
        assert res_ok[p]['map'] == res[p]['map']
    with pytest.raises(ValueError):
        one(ranking, dict(g, ok=[0, 2]))


def test_queries_without_positives_left_out():
    ranking = [3, 0, 5, 1, 7, 2, 6, 4]
    g0 = {'easy': [0, 2], 'hard': [5, 4], 'junk': [1]}  # APs 1/3, 403/840, 23/80 (see above)
    g1 = {'easy': [3], 'junk': [0]}                       # easy/medium AP 1; no hard positives
    g2 = {'junk': [3, 5]}                                 # no positives at all
    res = revisited(np.array([ranking] * 3), [g0, g1, g2])
    assert res['easy']['n_queries'] == 2 and res['medium']['n_queries'] == 2
    assert res['hard']['n_queries'] == 1
    assert res['easy']['map'] == pytest.approx((1 / 3 + 1) / 2, abs=1e-15)
    assert res['medium']['map'] == pytest.approx((403 / 840 + 1) / 2, abs=1e-15)
    assert res['hard']['map'] == pytest.approx(23 / 80, abs=1e-15)
    assert np.isnan(res['hard']['aps'][1]) and np.isnan(res['hard']['aps'][2])
    assert np.isnan(res['easy']['aps'][2]) and res['easy']['aps'][1] == pytest.approx(1.0)
    assert np.isnan(res['medium']['prs'][2]).all()
    # medium mP@1: query 0 -> 0, query 1 -> 1 (image 3 at position 0) -> mean 1/2
    assert res['medium']['mp'][0] == pytest.approx(0.5)
    # all queries empty: NaN, n_queries 0
    res_empty = revisited(np.array([ranking]), [g2])
    for p in ('easy', 'medium', 'hard'):
        assert np.isnan(res_empty[p]['map']) and res_empty[p]['n_queries'] == 0
        assert np.isnan(res_empty[p]['mp']).all() and np.isnan(res_empty[p]['aps']).all()
    # no queries at all
    res_none = revisited(np.zeros((0, 8), dtype=np.int64), [])
    assert np.isnan(res_none['medium']['map']) and res_none['medium']['aps'].shape == (0,)


def test_old_style_ok_counts_for_medium_only():
    ranking = [3, 0, 5, 1, 7, 2, 6, 4]
    res = one(ranking, {'ok': [0, 2, 5, 4], 'junk': [1]})
    assert res['medium']['map'] == pytest.approx(403 / 840, abs=1e-15)
    assert res['easy']['n_queries'] == 0 and res['hard']['n_queries'] == 0


def test_depends_only_on_the_order():
    rng = np.random.default_rng(1)
    n_db, nq = 60, 7
    ranks = np.stack([rng.permutation(n_db) for _ in range(nq)])
    gnd = []
    for _ in range(nq):
        ids = rng.permutation(n_db)[:12]
        gnd.append({'easy': ids[:3].tolist(), 'hard': ids[3:6].tolist(), 'junk': ids[6:12].tolist()})
    base = revisited(ranks, gnd)
    # 1) renaming the database images (consistently in ranks and gnd) changes nothing
    perm = rng.permutation(n_db)
    gnd_r = [{k: perm[v].tolist() for k, v in g.items()} for g in gnd]
    renamed = revisited(perm[ranks], gnd_r)
    # 2) shuffling the negatives among their own positions changes nothing
    shuffled = ranks.copy()
    for q, g in enumerate(gnd):
        rel = set(g['easy']) | set(g['hard']) | set(g['junk'])
        slots = [i for i, x in enumerate(ranks[q]) if x not in rel]
        shuffled[q, slots] = rng.permutation(ranks[q, slots])
    # 3) lists given in another order / with duplicates change nothing
    gnd_d = [{k: list(reversed(v)) + v[:1] for k, v in g.items()} for g in gnd]
    for res in (renamed, revisited(shuffled, gnd), revisited(ranks, gnd_d)):
        for p in ('easy', 'medium', 'hard'):
            np.testing.assert_array_equal(res[p]['aps'], base[p]['aps'])
            np.testing.assert_array_equal(res[p]['mp'], base[p]['mp'])
            np.testing.assert_array_equal(res[p]['mr'], base[p]['mr'])
    # but reversing the rankings does change it
    rev = revisited(ranks[:, ::-1], gnd)
    assert not np.allclose(rev['medium']['aps'], base['medium']['aps'])


# ----------------------------------------------------------------------------------------------
# Cross-checks against the revisitop transcription
# ----------------------------------------------------------------------------------------------

def random_case(rng, n_db, nq, overlap):
    ranks = np.stack([rng.permutation(n_db) for _ in range(nq)]).T  # revisitop layout (n_db, nq)
    gnd = []
    for _ in range(nq):
        n_ok = int(rng.integers(0, 15)) if rng.random() > 0.1 else 0
        n_junk = int(rng.integers(0, 20))
        if overlap:  # independent draws: ok and junk may share images, as revisitop tolerates
            ok = rng.choice(n_db, n_ok, replace=False)
            junk = rng.choice(n_db, n_junk, replace=False)
        else:
            ids = rng.permutation(n_db)
            ok, junk = ids[:n_ok], ids[n_ok:n_ok + n_junk]
        g = {'ok': ok.tolist()}
        if rng.random() > 0.1:
            g['junk'] = junk.tolist()
        gnd.append(g)
    return ranks, gnd


@pytest.mark.parametrize('overlap', [False, True])
def test_compute_map_matches_revisitop(overlap):
    rng = np.random.default_rng(2 + overlap)
    kappas = [1, 3, 5, 10, 100]
    for trial in range(30):
        n_db, nq = int(rng.integers(20, 300)), int(rng.integers(1, 12))
        ranks, gnd = random_case(rng, n_db, nq, overlap)
        if all(len(g['ok']) == 0 for g in gnd):
            gnd[0]['ok'] = [int(ranks[0, 0])]
        m_ref, aps_ref, pr_ref, prs_ref = ref_compute_map(ranks.copy(), gnd, kappas)
        m, aps, pr, prs = compute_map(ranks, gnd, kappas)
        assert m == pytest.approx(m_ref, rel=1e-12)
        np.testing.assert_allclose(aps, aps_ref, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(pr, pr_ref, rtol=1e-12)
        np.testing.assert_allclose(prs, prs_ref, rtol=1e-12)


def test_compute_map_positives_outside_database():
    # revisitop counts every 'ok' entry in n_positives, also one the ranking does not contain
    ranks = np.array([[4, 0, 3, 1, 2]]).T
    gnd = [{'ok': [0, 2, 99], 'junk': [3]}]
    m_ref, aps_ref, pr_ref, _ = ref_compute_map(ranks.copy(), gnd, [1, 5])
    m, aps, pr, _ = compute_map(ranks, gnd, [1, 5])
    # kept [4,0,1,2]: positives at 1, 3 of n=3: (0+1/2)/2/3 + (1/3+2/4)/2/3 = 1/12 + 5/36 = 2/9
    assert m == pytest.approx(2 / 9, abs=1e-15) and m_ref == pytest.approx(2 / 9, abs=1e-15)
    np.testing.assert_allclose(pr, pr_ref)


def test_revisited_matches_revisitop_per_protocol():
    rng = np.random.default_rng(7)
    kappas = (1, 5, 10)
    for trial in range(10):
        n_db, nq = int(rng.integers(30, 400)), int(rng.integers(1, 15))
        ranks = np.stack([rng.permutation(n_db) for _ in range(nq)])
        gnd = []
        for _ in range(nq):
            ids = rng.permutation(n_db)
            ne, nh, nj = (int(x) for x in rng.integers(0, 10, size=3))
            gnd.append({'easy': ids[:ne].tolist(), 'hard': ids[ne:ne + nh].tolist(),
                        'junk': ids[ne + nh:ne + nh + nj].tolist()})
        res = revisited(ranks, gnd, kappas)
        for p in ('easy', 'medium', 'hard'):
            pg = protocol_gnd(gnd, p)
            n_valid = sum(len(g['ok']) > 0 for g in pg)
            assert res[p]['n_queries'] == n_valid
            if n_valid == 0:
                assert np.isnan(res[p]['map'])
                continue
            m_ref, aps_ref, pr_ref, _ = ref_compute_map(ranks.T.copy(), pg, list(kappas))
            assert res[p]['map'] == pytest.approx(m_ref, rel=1e-12)
            np.testing.assert_allclose(res[p]['aps'], aps_ref, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(res[p]['mp'], pr_ref, rtol=1e-12)
            np.testing.assert_allclose(res[p]['mr'], ref_recall(ranks.T, pg, kappas), rtol=1e-12)


def test_large_database_runs():
    # 200k images, a few queries: one O(n_database) pass per query
    rng = np.random.default_rng(3)
    n_db, nq = 200_000, 4
    ranks = np.stack([rng.permutation(n_db).astype(np.int32) for _ in range(nq)])
    gnd = [{'easy': ranks[q, [0, 10, 1000]].tolist(), 'hard': ranks[q, [5, 50_000]].tolist(),
            'junk': ranks[q, [1, 2, 3]].tolist()} for q in range(nq)]
    res = revisited(ranks, gnd)
    # easy: positives at 0, 10, 1000; junk 1, 2, 3 and hard 5 come before the last two (the other
    # hard image, at 50000, after them all) -> kept positions 0, 10-4 = 6, 1000-4 = 996
    ap_easy = ref_compute_ap([0, 6, 996], 3)
    assert res['easy']['map'] == pytest.approx(ap_easy, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Bad inputs and formatting
# ----------------------------------------------------------------------------------------------

def test_bad_inputs():
    ok_ranks = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    gnd = [{'easy': [0]}, {'hard': [1]}]
    revisited(ok_ranks, gnd)
    with pytest.raises(ValueError, match='permutation'):
        revisited(np.array([[0, 1, 1, 3], [3, 2, 1, 0]]), gnd)        # duplicate
    with pytest.raises(ValueError, match='permutation'):
        revisited(np.array([[0, 1, 2, 3], [3, 3, 3, 3]]), [{'easy': [0]}, {}])  # empty query too
    with pytest.raises(ValueError, match='outside'):
        revisited(np.array([[0, 1, 2, 4], [3, 2, 1, 0]]), gnd)        # out of range
    with pytest.raises(ValueError, match='outside'):
        revisited(np.array([[0, 1, 2, -1], [3, 2, 1, 0]]), gnd)
    with pytest.raises(ValueError):
        revisited(np.array([0, 1, 2, 3]), gnd[:1])                     # 1-D
    with pytest.raises(ValueError):
        revisited(ok_ranks.T[:, :2].T[:1], gnd)                        # wrong number of rows
    with pytest.raises(ValueError):
        revisited(ok_ranks, gnd[:1])
    with pytest.raises(ValueError):
        revisited(ok_ranks.astype(np.float64), gnd)                    # not integers
    with pytest.raises(ValueError, match='outside'):
        revisited(ok_ranks, [{'easy': [4]}, {}])                       # gnd index out of range
    with pytest.raises(ValueError, match='outside'):
        revisited(ok_ranks, [{'junk': [-1]}, {}])
    with pytest.raises(ValueError):
        revisited(ok_ranks, [{'easy': [0.5]}, {}])
    with pytest.raises(ValueError):
        revisited(ok_ranks, ['easy', 'hard'])
    with pytest.raises(ValueError):
        revisited(ok_ranks, gnd, kappas=(0, 5))
    with pytest.raises(ValueError):
        compute_map(ok_ranks, gnd[:1])                                 # (n_db, nq) layout: 2 cols
    with pytest.raises(ValueError):
        compute_map(np.arange(4), gnd)


def test_format_table():
    ranking = [3, 0, 5, 1, 7, 2, 6, 4]
    res = one(ranking, {'easy': [0, 2], 'hard': [5, 4], 'junk': [1]})
    text = format_table(res)
    assert 'mP@10' in text and 'medium' in text
    assert '47.98' in text  # medium mAP 403/840 = 47.976 %
    assert '33.33' in text and '28.75' in text
    assert 'mAP E/M/H: 33.33 / 47.98 / 28.75' in text
