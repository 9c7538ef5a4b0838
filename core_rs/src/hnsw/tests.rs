use super::*;
use crate::scan::exact_top_k;
use std::io::Cursor;

/// MF-like vectors: gaussian directions times lognormal norms `exp(N(0, 0.5))`.
fn mf_vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let v: Vec<f64> = (0..dim).map(|_| r.normal()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let scale = (0.5 * r.normal()).exp() / norm;
        out.extend(v.iter().map(|x| (x * scale) as f32));
    }
    out
}

fn build(data: &[f32], dim: usize, cfg: HnswConfig) -> Hnsw {
    let mut h = Hnsw::new(dim, cfg);
    for (i, v) in data.chunks_exact(dim).enumerate() {
        h.upsert(i as u32, v);
    }
    h
}

/// Mean recall@k of `h` against the exact scan over `data` (rows with `alive` true).
fn recall(
    h: &Hnsw,
    data: &[f32],
    dim: usize,
    queries: &[f32],
    k: usize,
    ef: usize,
    alive: &dyn Fn(u32) -> bool,
) -> f64 {
    let mut hit = 0usize;
    let mut total = 0usize;
    for q in queries.chunks_exact(dim) {
        let truth: Vec<u32> = exact_top_k(data, dim, q, k, alive).iter().map(|x| x.0).collect();
        let got = h.search(q, k, ef, &|_| true);
        hit += got.iter().filter(|x| truth.contains(&x.0)).count();
        total += truth.len();
    }
    hit as f64 / total as f64
}

/// Zipf-like (density ∝ 1/(x+1)) id in [0, n): a few popular items move most often.
fn skewed_id(r: &mut Rng, n: usize) -> u32 {
    let x = ((n + 1) as f64).powf(r.next_f64()) - 1.0;
    (x as usize).min(n - 1) as u32
}

/// One small move, as online MF makes: `v += 0.05 * |v| * gaussian / sqrt(dim)`.
fn nudge(r: &mut Rng, v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let step = 0.05 * norm / (v.len() as f32).sqrt();
    for x in v.iter_mut() {
        *x += step * r.normal() as f32;
    }
}

fn saved(h: &Hnsw) -> Vec<u8> {
    let mut b = Vec::new();
    h.save(&mut b).unwrap();
    b
}

#[test]
fn recall_at_10_on_mf_like_vectors_at_ef_64() {
    let (n, dim) = (20_000, 32);
    let data = mf_vectors(n, dim, 1);
    let queries = mf_vectors(200, dim, 2);
    let h = build(&data, dim, HnswConfig::default());
    h.check_invariants().unwrap();
    assert_eq!(h.len(), n);
    let r = recall(&h, &data, dim, &queries, 10, 64, &|_| true);
    assert!(r >= 0.95, "recall@10 at ef=64 is {r}");
    // A wider beam never hurts much and a narrow one should be clearly worse than exact.
    let r_wide = recall(&h, &data, dim, &queries, 10, 200, &|_| true);
    assert!(r_wide >= r - 0.01, "ef=200 recall {r_wide} < ef=64 recall {r}");
}

#[test]
fn moves_and_deletes_keep_invariants_and_recall_of_a_fresh_build() {
    let (n, dim) = (10_000, 32);
    let cfg = HnswConfig { ef_construction: 100, ..HnswConfig::default() };
    let mut data = mf_vectors(n, dim, 3);
    let queries = mf_vectors(200, dim, 4);
    let mut h = build(&data, dim, cfg.clone());
    let mut r = Rng::new(5);
    for _ in 0..10_000 {
        let id = skewed_id(&mut r, n);
        let row = &mut data[id as usize * dim..(id as usize + 1) * dim];
        nudge(&mut r, row);
        h.upsert(id, row);
    }
    h.check_invariants().unwrap();
    for i in 0..n as u32 {
        assert_eq!(h.vector(i).unwrap(), &data[i as usize * dim..(i as usize + 1) * dim]);
    }
    let moved = recall(&h, &data, dim, &queries, 10, 64, &|_| true);
    let fresh = build(&data, dim, cfg);
    let base = recall(&fresh, &data, dim, &queries, 10, 64, &|_| true);
    assert!(moved >= base - 0.02, "after moves {moved}, fresh build {base}");

    let mut gone = vec![false; n];
    for _ in 0..1000 {
        let id = skewed_id(&mut r, n);
        assert_eq!(h.delete(id), !gone[id as usize]);
        gone[id as usize] = true;
    }
    h.check_invariants().unwrap();
    assert_eq!(h.len(), n - gone.iter().filter(|&&g| g).count());
    let alive = |id: u32| !gone[id as usize];
    for q in queries.chunks_exact(dim) {
        let got = h.search(q, 10, 64, &|_| true);
        assert_eq!(got.len(), 10);
        assert!(got.iter().all(|x| alive(x.0)), "a deleted id was returned");
    }
    let after_delete = recall(&h, &data, dim, &queries, 10, 64, &alive);
    assert!(after_delete >= base - 0.03, "after deletes {after_delete}, fresh build {base}");
}

#[test]
fn filtered_search_excludes_and_still_fills_k_when_90_percent_rejected() {
    let (n, dim) = (5_000, 16);
    let data = mf_vectors(n, dim, 6);
    let mut h = build(&data, dim, HnswConfig { ef_construction: 100, ..HnswConfig::default() });
    for id in (0..n as u32).step_by(7) {
        h.delete(id);
    }
    let keep = |id: u32| id % 10 == 3; // 90% excluded by the filter
    let alive = |id: u32| keep(id) && !id.is_multiple_of(7);
    let queries = mf_vectors(50, dim, 7);
    let mut hit = 0;
    for q in queries.chunks_exact(dim) {
        let got = h.search(q, 10, 20, &keep);
        assert_eq!(got.len(), 10);
        assert!(got.iter().all(|x| alive(x.0)), "excluded or deleted id returned: {got:?}");
        assert!(got.windows(2).all(|w| w[0].1 >= w[1].1), "not best first");
        let truth: Vec<u32> = exact_top_k(&data, dim, q, 10, &alive).iter().map(|x| x.0).collect();
        hit += got.iter().filter(|x| truth.contains(&x.0)).count();
    }
    assert!(hit as f64 / 500.0 >= 0.9, "filtered recall {}", hit as f64 / 500.0);
    // A filter that keeps only 3 ids still finds all 3.
    let got = h.search(&queries[..dim], 10, 10, &|id| id == 3 || id == 13 || id == 4001);
    let mut ids: Vec<u32> = got.iter().map(|x| x.0).collect();
    ids.sort();
    assert_eq!(ids, vec![3, 13, 4001]);
}

#[test]
fn save_load_round_trip_gives_identical_results() {
    let dim = 24;
    let data = mf_vectors(3_000, dim, 8);
    let mut h = build(&data, dim, HnswConfig { ef_construction: 60, ..HnswConfig::default() });
    h.delete(17);
    h.upsert(5_000, &data[..dim]); // a gap in the ids
    let bytes = saved(&h);
    let g = Hnsw::load(&mut Cursor::new(&bytes)).unwrap();
    g.check_invariants().unwrap();
    assert_eq!(saved(&g), bytes);
    assert_eq!(g.len(), h.len());
    assert!(!g.contains(17) && g.contains(5_000) && !g.contains(4_999));
    for q in mf_vectors(50, dim, 9).chunks_exact(dim) {
        assert_eq!(g.search(q, 10, 40, &|_| true), h.search(q, 10, 40, &|_| true));
    }
}

#[test]
fn corrupted_files_are_invalid_data() {
    let dim = 8;
    let h = build(&mf_vectors(300, dim, 10), dim, HnswConfig::default());
    let bytes = saved(&h);
    let kind = |b: &[u8]| Hnsw::load(&mut Cursor::new(b)).err().map(|e| e.kind());
    for at in [0, 9, 25, bytes.len() / 2, bytes.len() - 1] {
        let mut b = bytes.clone();
        b[at] ^= 0x40;
        assert_eq!(kind(&b), Some(std::io::ErrorKind::InvalidData), "flipped byte {at}");
    }
    for len in [0, 5, 19, bytes.len() / 3, bytes.len() - 1] {
        assert_eq!(kind(&bytes[..len]), Some(std::io::ErrorKind::InvalidData), "truncated to {len}");
    }
    let mut b = bytes.clone();
    b[..8].copy_from_slice(b"NOTHNSW\0");
    let err = Hnsw::load(&mut Cursor::new(&b)).err().unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("magic"), "{err}");
    let mut b = bytes.clone();
    b[8] = 99; // version
    let err = Hnsw::load(&mut Cursor::new(&b)).err().unwrap();
    assert!(err.to_string().contains("version 99"), "{err}");
}

#[test]
fn same_seed_and_inputs_give_an_identical_graph() {
    let dim = 16;
    let data = mf_vectors(2_000, dim, 11);
    let cfg = HnswConfig { ef_construction: 50, seed: 9, ..HnswConfig::default() };
    let run = |cfg: HnswConfig| {
        let mut h = build(&data, dim, cfg);
        let mut r = Rng::new(12);
        let mut d = data.clone();
        for _ in 0..500 {
            let id = skewed_id(&mut r, 2_000) as usize;
            nudge(&mut r, &mut d[id * dim..(id + 1) * dim]);
            h.upsert(id as u32, &d[id * dim..(id + 1) * dim]);
        }
        h.delete(3);
        saved(&h)
    };
    assert_eq!(run(cfg.clone()), run(cfg.clone()));
    assert_ne!(run(cfg.clone()), run(HnswConfig { seed: 10, ..cfg }));
}

#[test]
fn deletes_entry_point_undelete_and_small_graphs() {
    let dim = 4;
    let mut h = Hnsw::new(dim, HnswConfig::default());
    assert!(h.is_empty());
    assert!(h.search(&[1.0; 4], 5, 10, &|_| true).is_empty());
    h.check_invariants().unwrap();
    h.upsert(10, &[1.0, 0.0, 0.0, 0.0]);
    assert_eq!(h.search(&[1.0; 4], 5, 10, &|_| true), vec![(10, 1.0)]);
    h.upsert(10, &[2.0, 0.0, 0.0, 0.0]); // update of a lone node
    assert_eq!(h.search(&[1.0; 4], 5, 10, &|_| true), vec![(10, 2.0)]);
    let data = mf_vectors(500, dim, 13);
    for (i, v) in data.chunks_exact(dim).enumerate() {
        h.upsert(100 + i as u32, v);
    }
    h.check_invariants().unwrap();
    assert!(!h.contains(50) && h.vector(50).is_none());
    let entry = h.entry.unwrap();
    assert!(h.delete(entry));
    assert!(!h.delete(entry));
    h.check_invariants().unwrap();
    let top = h.max_level;
    let live_on_top = (0..h.levels.len()).any(|i| h.levels[i] as usize == top && !h.deleted[i]);
    assert_eq!(h.deleted[h.entry.unwrap() as usize], !live_on_top);
    let q = h.vec(entry).to_vec();
    assert!(h.search(&q, 501, 600, &|_| true).iter().all(|x| x.0 != entry));
    assert_eq!(h.search(&q, 600, 600, &|_| true).len(), 500);
    h.upsert(entry, &q); // re-upsert undeletes
    assert!(h.contains(entry));
    assert_eq!(h.len(), 501);
    h.check_invariants().unwrap();
    let got = h.search(&q, 1, 100, &|id| id == entry);
    assert_eq!(got[0].0, entry);
}

#[test]
fn concurrent_searches_match_sequential_ones() {
    let dim = 16;
    let data = mf_vectors(3_000, dim, 14);
    let h = build(&data, dim, HnswConfig { ef_construction: 60, ..HnswConfig::default() });
    let queries = mf_vectors(40, dim, 15);
    let want: Vec<_> = queries.chunks_exact(dim).map(|q| h.search(q, 10, 50, &|_| true)).collect();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for (q, w) in queries.chunks_exact(dim).zip(&want) {
                    assert_eq!(&h.search(q, 10, 50, &|_| true), w);
                }
            });
        }
    });
}

#[test]
fn a_large_move_relinks_the_node_at_its_new_place() {
    let dim = 16;
    let mut data = mf_vectors(3_000, dim, 16);
    let mut h = build(&data, dim, HnswConfig { ef_construction: 60, ..HnswConfig::default() });
    let mut r = Rng::new(17);
    // Queries around `target`; both the moved node and its new twin must be found.
    let mut check = |h: &Hnsw, moved: u32, target: &[f32], twin: u32| {
        for _ in 0..50 {
            let q: Vec<f32> = target.iter().map(|x| x + 0.2 * r.normal() as f32).collect();
            let truth: Vec<u32> = {
                let d: Vec<f32> = (0..3_000u32).flat_map(|i| h.vec(i).to_vec()).collect();
                exact_top_k(&d, dim, &q, 10, &|_| true).iter().map(|x| x.0).collect()
            };
            let ids: Vec<u32> = h.search(&q, 10, 40, &|_| true).iter().map(|x| x.0).collect();
            for id in [moved, twin] {
                assert_eq!(truth.contains(&id), ids.contains(&id), "{id}: {ids:?} vs {truth:?}");
            }
        }
    };
    // One jump: 5 lands (a hair above) on 77.
    let target: Vec<f32> = data[77 * dim..78 * dim].iter().map(|x| x * 1.001).collect();
    h.upsert(5, &target);
    h.check_invariants().unwrap();
    assert_eq!(h.vector(5).unwrap(), &target[..]);
    data[5 * dim..6 * dim].copy_from_slice(&target);
    check(&h, 5, &target, 77);
    // Many small moves in one direction add up to a re-link too: 6 walks onto 900.
    let far: Vec<f32> = data[900 * dim..901 * dim].iter().map(|x| x * 1.001).collect();
    let start: Vec<f32> = data[6 * dim..7 * dim].to_vec();
    for t in 1..=40 {
        let a = t as f32 / 40.0;
        let v: Vec<f32> = start.iter().zip(&far).map(|(s, f)| s * (1.0 - a) + f * a).collect();
        h.upsert(6, &v);
    }
    h.check_invariants().unwrap();
    check(&h, 6, &far, 900);
}

#[test]
fn reserve_huge_keeps_contents_and_grows_geometrically() {
    // 8 MB: above the huge-page threshold, so the copying path is taken.
    let mut v: Vec<u32> = (0..2_000_000).collect();
    let before = v.capacity();
    reserve_huge(&mut v, 2_000_001);
    assert!(v.capacity() >= 2 * before, "capacity {}", v.capacity());
    assert_eq!(v.len(), 2_000_000);
    assert!(v.iter().enumerate().all(|(i, &x)| x as usize == i));
    // Within capacity: nothing moves.
    let ptr = v.as_ptr();
    reserve_huge(&mut v, 3_000_000);
    assert_eq!(v.as_ptr(), ptr);
    // Small arrays take the plain path.
    let mut s: Vec<f32> = vec![1.5; 10];
    reserve_huge(&mut s, 1000);
    assert!(s.capacity() >= 1000 && s == vec![1.5; 10]);
}

#[test]
fn greedy_descent_stops_at_a_local_maximum_of_its_layer() {
    let dim = 16;
    let data = mf_vectors(3000, dim, 11);
    let h = build(&data, dim, HnswConfig::default());
    assert!(h.max_level >= 1, "graph too small to have an upper layer");
    let queries = mf_vectors(50, dim, 12);
    let entry = h.entry.expect("entry");
    for q in queries.chunks(dim) {
        let start = Cand { s: dot(q, h.vec(entry)), id: entry };
        let mut cur = start;
        for l in (1..=h.max_level).rev() {
            let next = h.greedy(q, cur, l);
            // Never worse than where it started, and no neighbour on the layer beats it.
            assert!(next >= cur);
            for &n in h.links(next.id, l) {
                assert!(dot(q, h.vec(n)) <= next.s, "neighbour {n} beats {next:?}");
            }
            cur = next;
        }
        assert_eq!(cur, h.descend(q, start, 0));
    }
}

/// New nodes inserted in parallel-searched batches give a graph as good as single inserts,
/// with every invariant, and the same graph whatever the number of threads.
#[test]
fn batched_inserts_match_single_inserts_in_recall_and_ignore_the_thread_count() {
    let (n, dim) = (8_000, 32);
    let cfg = HnswConfig { ef_construction: 100, ..HnswConfig::default() };
    let data = mf_vectors(n, dim, 11);
    let queries = mf_vectors(200, dim, 12);
    let rows: Vec<(u32, &[f32])> = data.chunks_exact(dim).enumerate().map(|(i, v)| (i as u32, v)).collect();
    let batched = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut h = Hnsw::new(dim, cfg.clone());
            h.insert_many(&rows);
            h
        })
    };
    let (one, four) = (batched(1), batched(4));
    one.check_invariants().unwrap();
    assert_eq!(one.len(), n);
    assert!(one.insert_batch_len() > 1, "the build never reached a parallel batch");
    assert_eq!(saved(&one), saved(&four));
    let single = build(&data, dim, cfg);
    let base = recall(&single, &data, dim, &queries, 10, 64, &|_| true);
    let got = recall(&one, &data, dim, &queries, 10, 64, &|_| true);
    assert!(got >= base - 0.01, "batched {got}, single inserts {base}");
    // Inserts into a graph that already holds nodes, some of them deleted.
    let mut h =
        build(&data[..2_000 * dim], dim, HnswConfig { ef_construction: 100, ..HnswConfig::default() });
    for id in (0..2_000).step_by(7) {
        h.delete(id);
    }
    h.insert_many(&rows[2_000..]);
    h.check_invariants().unwrap();
    let alive = |id: u32| id >= 2_000 || !id.is_multiple_of(7);
    assert!(recall(&h, &data, dim, &queries, 10, 64, &alive) >= base - 0.02);
}
