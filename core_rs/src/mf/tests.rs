use std::collections::HashSet;
use std::io;

use super::*;
use crate::rng::Rng;

/// A planted low-rank world: true user and item factors (dim 8), Zipf-like item popularity,
/// and each user's items sampled without replacement by softmax of true scores.
struct Planted {
    n_items: usize,
    /// Per user, items in time order.
    seqs: Vec<Vec<u32>>,
}

fn planted(n_users: usize, n_items: usize, len: impl Fn(&mut Rng) -> usize, seed: u64) -> Planted {
    const K: usize = 8;
    let mut rng = Rng::new(seed);
    let users: Vec<f64> = (0..n_users * K).map(|_| rng.normal()).collect();
    let items: Vec<f64> = (0..n_items * K).map(|_| rng.normal()).collect();
    let mut seqs = Vec::with_capacity(n_users);
    let mut wts = vec![0.0f64; n_items];
    for u in 0..n_users {
        let x = &users[u * K..(u + 1) * K];
        for i in 0..n_items {
            let y = &items[i * K..(i + 1) * K];
            let s: f64 = x.iter().zip(y).map(|(a, b)| a * b).sum();
            // Zipf-like popularity bias on top of the planted preference.
            let bias = -0.7 * ((i + 1) as f64).ln();
            wts[i] = (0.9 * s + bias).exp();
        }
        let n = len(&mut rng).min(n_items);
        let mut seq = Vec::with_capacity(n);
        let mut total: f64 = wts.iter().sum();
        for _ in 0..n {
            let mut t = rng.next_f64() * total;
            let mut pick = n_items - 1;
            for (i, &w) in wts.iter().enumerate() {
                if w > 0.0 && t < w {
                    pick = i;
                    break;
                }
                t -= w;
            }
            while wts[pick] == 0.0 {
                pick -= 1;
            }
            total -= wts[pick];
            wts[pick] = 0.0;
            seq.push(pick as u32);
        }
        seqs.push(seq);
    }
    Planted { n_items, seqs }
}

/// Whether `target` ranks in the top `k` of `scores`, skipping `seen` items. Ties count
/// against the target, so a model that scores everything alike earns no hits.
fn hit_at(scores: &[f32], target: u32, seen: &HashSet<u32>, k: usize) -> bool {
    let s = scores[target as usize];
    let better = scores
        .iter()
        .enumerate()
        .filter(|&(j, &v)| v >= s && j as u32 != target && !seen.contains(&(j as u32)))
        .count();
    better < k
}

fn model_scores(m: &Mf, u: u32) -> Vec<f32> {
    (0..m.n_items() as u32).map(|i| m.score(u, i)).collect()
}

fn cfg() -> MfConfig {
    MfConfig { seed: 42, ..MfConfig::default() }
}

/// Trains on all but the last item of each user (time = position in the sequence), returns
/// (model HR@10, popularity HR@10) on the held-out last items.
fn holdout_hr(p: &Planted, cfg: MfConfig, iters: usize) -> (f64, f64, Mf) {
    let mut m = Mf::new(cfg);
    let mut pop = vec![0.0f32; p.n_items];
    for (u, seq) in p.seqs.iter().enumerate() {
        for (t, &i) in seq[..seq.len() - 1].iter().enumerate() {
            m.add(u as u32, i, 1.0, t as f64);
            pop[i as usize] += 1.0;
        }
    }
    m.fit(iters);
    let (mut hm, mut hp, mut n) = (0usize, 0usize, 0usize);
    for (u, seq) in p.seqs.iter().enumerate() {
        let seen: HashSet<u32> = seq[..seq.len() - 1].iter().copied().collect();
        let target = *seq.last().unwrap();
        hm += hit_at(&model_scores(&m, u as u32), target, &seen, 10) as usize;
        hp += hit_at(&pop, target, &seen, 10) as usize;
        n += 1;
    }
    (hm as f64 / n as f64, hp as f64 / n as f64, m)
}

#[test]
fn planted_fit_beats_popularity() {
    let p = planted(2000, 1000, |r| 10 + r.below(21) as usize, 1);
    let (hr, pop, _) = holdout_hr(&p, cfg(), 10);
    println!("planted HR@10: model {hr:.4}, popularity {pop:.4}");
    assert!(hr >= 1.5 * pop, "model {hr} vs popularity {pop}");
}

#[test]
fn history_caps_bound_lengths_and_cost_little_quality() {
    // Heavy users (up to 300 events) and Zipf items make both caps bind.
    let p = planted(
        1500,
        800,
        |r| {
            if r.below(5) == 0 {
                100 + r.below(201) as usize
            } else {
                10 + r.below(21) as usize
            }
        },
        2,
    );
    let unbounded = MfConfig { user_history_cap: 1 << 30, item_history_cap: 1 << 30, ..cfg() };
    let (hr_full, pop, _) = holdout_hr(&p, unbounded, 10);
    let capped = MfConfig { user_history_cap: 50, item_history_cap: 50, ..cfg() };
    let (hr_cap, _, m) = holdout_hr(&p, capped, 10);
    println!("caps HR@10: unbounded {hr_full:.4}, caps 50/50 {hr_cap:.4}, popularity {pop:.4}");
    for u in 0..m.n_users() as u32 {
        assert!(m.user_items(u).len() <= 50);
    }
    for i in 0..m.n_items() as u32 {
        assert!(m.item_users(i).len() <= 50);
    }
    assert!(p.seqs.iter().any(|s| s.len() > 60), "caps must bind for the test to mean anything");
    assert!(hr_cap > pop, "capped model {hr_cap} vs popularity {pop}");
    assert!(hr_cap >= 0.6 * hr_full, "caps cost too much: {hr_cap} vs {hr_full}");
}

/// Users 0..1600 are known at fit time except for their last 3 events; users 1600..2000
/// arrive only in the stream. Test-then-train: each streamed event (after a user's first) is
/// first ranked by the updated model, by the model frozen after `fit`, and by fit-time
/// popularity, then fed to the updated model. Returns HR@10 as `[known, new][updated,
/// frozen, popularity]`.
fn stream_hr(cfg: MfConfig) -> [[f64; 3]; 2] {
    let p = planted(2000, 1000, |r| 12 + r.below(19) as usize, 3);
    let n_old = 1600;
    let mut m = Mf::new(cfg);
    let mut seen: Vec<HashSet<u32>> = vec![HashSet::new(); p.seqs.len()];
    let mut pop = vec![0.0f32; p.n_items];
    let mut stream = Vec::new();
    for (u, seq) in p.seqs.iter().enumerate() {
        let split = if u < n_old { seq.len() - 3 } else { 0 };
        for (t, &i) in seq.iter().enumerate() {
            if t < split {
                m.add(u as u32, i, 1.0, t as f64);
                seen[u].insert(i);
                pop[i as usize] += 1.0;
            } else {
                stream.push((t, u as u32, i));
            }
        }
    }
    m.fit(10);
    let frozen_p = m.user_matrix().to_vec();
    let frozen_q = m.item_matrix().to_vec();
    let d = m.dim();
    stream.sort_by_key(|&(t, u, _)| (t, u));
    let mut hits = [[0usize; 3]; 2];
    let mut counts = [0usize; 2];
    for &(t, u, i) in &stream {
        let group = (u as usize >= n_old) as usize;
        let s = &seen[u as usize];
        if t > 0 {
            counts[group] += 1;
            hits[group][0] += hit_at(&model_scores(&m, u), i, s, 10) as usize;
            // Users unknown at fit time have no frozen vector: every item ties, no hit.
            let pu = frozen_p.get(u as usize * d..(u as usize + 1) * d).unwrap_or(&[]);
            let fs: Vec<f32> = frozen_q.chunks_exact(d).map(|q| kernels::dot(pu, q)).collect();
            hits[group][1] += hit_at(&fs, i, s, 10) as usize;
            hits[group][2] += hit_at(&pop, i, s, 10) as usize;
        }
        m.update(u, i, 1.0, 1000.0 + t as f64);
        seen[u as usize].insert(i);
    }
    let mut out = [[0.0; 3]; 2];
    for g in 0..2 {
        for k in 0..3 {
            out[g][k] = hits[g][k] as f64 / counts[g] as f64;
        }
    }
    out
}

#[test]
fn online_updates_help_streamed_users() {
    let [known, new] = stream_hr(cfg());
    println!(
        "stream HR@10: known users updated {:.4} frozen {:.4} popularity {:.4}; \
         new users updated {:.4} popularity {:.4}",
        known[0], known[1], known[2], new[0], new[2]
    );
    assert!(known[0] >= 0.95 * known[1], "known users must not degrade");
    assert!(known[0] > known[2], "known users: model above popularity");
    // New users have no frozen vector; updates alone must beat the popularity fallback.
    assert!(new[1] == 0.0);
    assert!(new[0] > 1.5 * new[2], "new users are learnt from the stream alone");
}

#[test]
fn update_raises_the_users_score_for_the_item() {
    let p = planted(300, 200, |r| 10 + r.below(11) as usize, 4);
    let mut m = Mf::new(cfg());
    for (u, seq) in p.seqs.iter().enumerate() {
        for &i in seq {
            m.add(u as u32, i, 1.0, 0.0);
        }
    }
    m.fit(5);
    let mut raised = 0;
    for u in 0..50u32 {
        // An item the user has not touched (held pairs may already score above the target 1,
        // where more weight rightly pulls the score down).
        let i = (0..200u32).filter(|i| !p.seqs[u as usize].contains(i)).nth(u as usize % 7).unwrap();
        let before = m.score(u, i);
        m.update(u, i, 1.0, 1.0);
        let after = m.score(u, i);
        assert!(after > before, "user {u} item {i}: {before} -> {after}");
        raised += 1;
    }
    assert_eq!(raised, 50);
    // A brand-new user and item get rows and a positive affinity after one event.
    let (nu, ni) = (m.n_users() as u32 + 3, m.n_items() as u32 + 2);
    m.update(nu, ni, 1.0, 2.0);
    assert_eq!(m.n_users(), nu as usize + 1);
    assert_eq!(m.n_items(), ni as usize + 1);
    assert!(m.score(nu, ni) > 0.0);
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-300)
}

fn check_gramians(m: &mut Mf) -> (f64, f64) {
    let (sp, sq) = (m.gramian_p().to_vec(), m.gramian_q());
    m.recompute_gramians();
    (rel_err(&sp, m.gramian_p()), rel_err(&sq, &m.gramian_q()))
}

fn streamed_model(cfg: MfConfig, n: usize, seed: u64) -> Mf {
    let mut m = Mf::new(cfg);
    let mut r = Rng::new(seed);
    for k in 0..2000 {
        m.add(r.below(100) as u32, r.below(50) as u32, 1.0, k as f64);
    }
    m.fit(3);
    for k in 0..n {
        // New users and items keep arriving; popular items get most events.
        let u = r.below(100 + k as u64 / 5) as u32;
        let i = (r.below(50 + k as u64 / 10) as f64 * r.next_f64()) as u32;
        m.update(u, i, 1.0 + (k % 3) as f32, 2000.0 + k as f64);
    }
    m
}

#[test]
fn incremental_gramians_match_exact_recomputation() {
    let c = MfConfig {
        dim: 16,
        decay_half_life: Some(500.0),
        user_history_cap: 8,
        item_history_cap: 16,
        ..cfg()
    };
    let mut m = streamed_model(c, 1000, 5);
    assert!(m.n_users() > 100 && m.n_items() > 50, "new rows arrived");
    let (ep, eq) = check_gramians(&mut m);
    println!("Gramian relative error after 1000 updates: S^p {ep:.2e}, S^q {eq:.2e}");
    assert!(ep < 1e-6 && eq < 1e-6, "S^p {ep}, S^q {eq}");
}

#[test]
fn erase_user_removes_every_trace() {
    let c = MfConfig { dim: 16, user_history_cap: 10, item_history_cap: 20, ..cfg() };
    let mut m = streamed_model(c, 1500, 6);
    for u in 0..m.n_users() as u32 {
        assert!(m.user_items(u).len() <= 10);
    }
    for i in 0..m.n_items() as u32 {
        assert!(m.item_users(i).len() <= 20);
        // Invariant: every item-history entry is also in its user's history.
        for (u, _) in m.item_users(i) {
            assert!(m.user_items(u).iter().any(|&(j, _)| j == i));
        }
    }
    let victim = (0..m.n_users() as u32).max_by_key(|&u| m.user_items(u).len()).unwrap();
    let held = m.user_items(victim);
    assert!(!held.is_empty());
    let counts_before: Vec<f64> = held.iter().map(|&(i, _)| m.item_count(i)).collect();
    m.erase_user(victim);
    assert!(m.user_items(victim).is_empty());
    assert!(m.user_vector(victim).iter().all(|&x| x == 0.0));
    for i in 0..m.n_items() as u32 {
        assert!(m.item_users(i).iter().all(|&(u, _)| u != victim));
    }
    for (k, &(i, _)) in held.iter().enumerate() {
        assert!(m.item_count(i) < counts_before[k], "count of item {i} must drop");
    }
    let (ep, eq) = check_gramians(&mut m);
    assert!(ep < 1e-6 && eq < 1e-6, "S^p {ep}, S^q {eq}");
    // Later updates never bring the erased user back into item histories.
    let other = if victim == 0 { 1 } else { 0 };
    let item = held[0].0;
    m.update(other, item, 1.0, 1e6);
    assert!(m.item_users(item).iter().all(|&(u, _)| u != victim));
    assert!(m.user_vector(victim).iter().all(|&x| x == 0.0));
}

#[test]
fn repeated_interactions_accumulate_with_decay() {
    let c = MfConfig { dim: 4, decay_half_life: Some(10.0), w_new: 2.0, ..cfg() };
    let mut m = Mf::new(c);
    m.add(0, 1, 1.0, 0.0);
    m.add(0, 1, 1.0, 10.0);
    // 1 decayed by one half-life + 1.
    assert_eq!(m.user_items(0), vec![(1, 1.5)]);
    m.update(0, 1, 1.0, 20.0);
    // 1.5 / 2 + w_new * 1.
    assert_eq!(m.user_items(0), vec![(1, 2.75)]);
    assert_eq!(m.item_users(1), vec![(0, 2.75)]);
    assert_eq!(m.item_count(1), 3.0);
    // Decay applies lazily as the clock advances.
    m.add(5, 2, 1.0, 30.0);
    assert_eq!(m.user_items(0), vec![(1, 1.375)]);
    // Invalid events change nothing.
    m.update(0, 1, f32::NAN, 40.0);
    m.update(0, 1, -1.0, 40.0);
    m.add(0, 1, 1.0, f64::NAN);
    assert_eq!(m.item_count(1), 3.0);
    assert_eq!(m.now(), 30.0);
}

#[test]
fn config_validation() {
    assert_eq!(MfConfig::default().validate(), Ok(()));
    assert!(MfConfig { dim: 0, ..cfg() }.validate().is_err());
    assert!(MfConfig { c0: f32::NAN, ..cfg() }.validate().is_err());
    assert!(MfConfig { reg: -1.0, ..cfg() }.validate().is_err());
    assert!(MfConfig { item_history_cap: 0, ..cfg() }.validate().is_err());
    assert!(MfConfig { decay_half_life: Some(0.0), ..cfg() }.validate().is_err());
}

#[test]
fn deterministic_under_the_seed() {
    let c = MfConfig { dim: 16, ..cfg() };
    let a = streamed_model(c.clone(), 500, 7);
    let b = streamed_model(c.clone(), 500, 7);
    assert_eq!(a.user_matrix(), b.user_matrix());
    assert_eq!(a.item_matrix(), b.item_matrix());
    let other = streamed_model(MfConfig { seed: 43, ..c }, 500, 7);
    assert_ne!(a.item_matrix(), other.item_matrix());
}

#[test]
fn save_load_round_trip_continues_identically() {
    let c = MfConfig { dim: 16, decay_half_life: Some(300.0), user_history_cap: 12, ..cfg() };
    let mut a = streamed_model(c, 600, 8);
    let mut buf = Vec::new();
    a.save(&mut buf).unwrap();
    let mut b = Mf::load(&mut buf.as_slice()).unwrap();
    assert_eq!(a.config(), b.config());
    assert_eq!(a.user_matrix(), b.user_matrix());
    assert_eq!(a.item_matrix(), b.item_matrix());
    for u in 0..a.n_users() as u32 {
        assert_eq!(a.user_items(u), b.user_items(u));
    }
    let mut r = Rng::new(9);
    for k in 0..300 {
        let (u, i) = (r.below(150) as u32, r.below(80) as u32);
        a.update(u, i, 1.0, 5000.0 + k as f64);
        b.update(u, i, 1.0, 5000.0 + k as f64);
    }
    assert_eq!(a.user_matrix(), b.user_matrix());
    assert_eq!(a.item_matrix(), b.item_matrix());
    assert_eq!(a.gramian_p(), b.gramian_p());

    // Every truncation fails cleanly.
    for cut in (0..buf.len()).step_by(97).chain([buf.len() - 1]) {
        let e = Mf::load(&mut &buf[..cut]).err().expect("truncated input must fail");
        assert!(
            matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData),
            "cut {cut}: {e}"
        );
    }
}

#[test]
fn load_rejects_corrupt_lengths_without_panicking() {
    // An empty model round-trips too (its clock is still −∞).
    let mut buf = Vec::new();
    Mf::new(cfg()).save(&mut buf).unwrap();
    let e = Mf::load(&mut buf.as_slice()).unwrap();
    assert_eq!((e.n_users(), e.n_items(), e.now()), (0, 0, f64::NEG_INFINITY));

    let mut a = Mf::new(MfConfig { dim: 4, ..cfg() });
    a.update(1, 2, 1.0, 0.0);
    let mut buf = Vec::new();
    a.save(&mut buf).unwrap();
    // Header: magic 4, version 4, dim 8, four f32 16, iters 8, caps 16, decay 9, init_std 4,
    // seed 8 = 77; then n_users at 77, n_items at 85.
    let at = |off: usize, v: u64| {
        let mut b = buf.clone();
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
        Mf::load(&mut b.as_slice()).err().expect("corrupt input must fail").kind()
    };
    assert_eq!(at(8, 0), io::ErrorKind::InvalidData); // dim 0
    assert_eq!(at(8, 1 << 40), io::ErrorKind::InvalidData); // absurd dim
    assert_eq!(at(77, u64::MAX), io::ErrorKind::InvalidData); // absurd n_users
    assert_eq!(at(77, 1 << 31), io::ErrorKind::UnexpectedEof); // plausible but absent
    assert_eq!(at(85, 1 << 31), io::ErrorKind::UnexpectedEof);
    // An item id in a history beyond the item count.
    let mut b = buf.clone();
    let n = b.len();
    // The last item history holds one entry: (id u32, n u32, w f32, ts f64) = 20 bytes.
    b[n - 20..n - 16].copy_from_slice(&999u32.to_le_bytes());
    assert_eq!(Mf::load(&mut b.as_slice()).err().unwrap().kind(), io::ErrorKind::InvalidData);
    let mut bad_magic = buf.clone();
    bad_magic[0] = b'X';
    assert_eq!(Mf::load(&mut bad_magic.as_slice()).err().unwrap().kind(), io::ErrorKind::InvalidData);
}

/// CPU time of the calling thread (Linux `schedstat`; NaN elsewhere): on a shared machine it
/// measures the work done, not the time spent waiting for a core.
fn thread_cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |ns| ns * 1e-9)
}

/// Online throughput at dim 64. Run with
/// `cargo test --release -p core_rs mf::tests::bench_online_updates -- --ignored --nocapture`.
/// Scenarios: short histories on a cache-resident model; then 100k users x 20k items with
/// skewed item popularity, where hot items fill their history caps and every item update
/// gathers `cap_i` scattered user rows.
#[test]
#[ignore]
fn bench_online_updates() {
    // (name, users, items, user cap, item cap, skewed items, dim)
    let scenarios = [
        ("short histories", 20_000u64, 5_000u64, 8usize, 8usize, false, 64usize),
        ("short histories", 20_000, 5_000, 8, 8, false, 32),
        ("skewed, caps 16/32", 100_000, 20_000, 16, 32, true, 64),
        ("skewed, caps 256/512", 100_000, 20_000, 256, 512, true, 64),
    ];
    for (name, n_users, n_items, cap_u, cap_i, skew, dim) in scenarios {
        let c = MfConfig { dim, user_history_cap: cap_u, item_history_cap: cap_i, ..cfg() };
        let mut m = Mf::new(c);
        let mut r = Rng::new(10);
        let draw = |r: &mut Rng| {
            let u = r.below(n_users) as u32;
            let i =
                if skew { (r.below(n_items) as f64 * r.next_f64()) as u32 } else { r.below(n_items) as u32 };
            (u, i)
        };
        // Warm up: every user and item exists with a little history.
        for k in 0..2 * n_users {
            let (u, i) = draw(&mut r);
            m.add(u, i, 1.0, k as f64);
        }
        m.fit(1);
        let n = 300_000usize;
        let events: Vec<(u32, u32)> = (0..n).map(|_| draw(&mut r)).collect();
        let (t0, c0) = (std::time::Instant::now(), thread_cpu_secs());
        for (k, &(u, i)) in events.iter().enumerate() {
            m.update(u, i, 1.0, 1e6 + k as f64);
        }
        let dt = t0.elapsed().as_secs_f64();
        let dc = thread_cpu_secs() - c0;
        let mean = |v: Vec<usize>| v.iter().sum::<usize>() as f64 / v.len() as f64;
        let hu = mean(events[..1000].iter().map(|e| m.user_items(e.0).len()).collect());
        let hi = mean(events[..1000].iter().map(|e| m.item_users(e.1).len()).collect());
        println!(
            "dim {dim}, {name}: {:.0} updates/s wall, {:.0} per CPU-second \
             (mean history per event: user {hu:.1}, item {hi:.1})",
            n as f64 / dt,
            n as f64 / dc
        );
    }
}

/// Grid over the missing-data and regularisation settings on the planted set (the evidence
/// behind `MfConfig::default`). Run with `-- --ignored --nocapture`.
#[test]
#[ignore]
fn tune_defaults_on_planted_set() {
    let p = planted(2000, 1000, |r| 10 + r.below(21) as usize, 1);
    for c0 in [64.0, 256.0, 512.0, 1024.0] {
        for alpha in [0.0, 0.4, 0.5] {
            for reg in [0.01, 0.1, 1.0] {
                let c = MfConfig { c0, alpha, reg, ..cfg() };
                let (hr, pop, _) = holdout_hr(&p, c, 10);
                println!("c0 {c0:6} alpha {alpha:.1} reg {reg:5}: HR@10 {hr:.4} (popularity {pop:.4})");
            }
        }
    }
    for w_new in [1.0, 2.0, 4.0] {
        for online_iters in [1, 2] {
            let [k, n] = stream_hr(MfConfig { w_new, online_iters, ..cfg() });
            println!(
                "w_new {w_new} online_iters {online_iters}: stream HR@10 known {:.4} (frozen {:.4}), new {:.4} (popularity {:.4})",
                k[0], k[1], n[0], n[2]
            );
        }
    }
}

/// Cost of the two O(dim²) kernels an online update runs twice each, at dim 64 with a history
/// of 8. Run with `-- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_kernels() {
    use kernels::{coord_sweep, replace_outer, Scratch};
    let (d, n, reps) = (64, 8, 200_000);
    let mut r = Rng::new(1);
    let mut s: Vec<f64> = vec![0.0; d * d];
    for _ in 0..2 * d {
        let v: Vec<f64> = (0..d).map(|_| r.normal()).collect();
        replace_outer(&mut s, d, 1.0, &v, 0.0, &v);
    }
    let x: Vec<f64> = (0..d).map(|_| r.normal() * 1e-3).collect();
    let mut acc = s.clone();
    let c0 = thread_cpu_secs();
    for _ in 0..reps {
        replace_outer(&mut acc, d, 1.0, &x, 1.0, &x);
    }
    let t_outer = (thread_cpu_secs() - c0) / reps as f64;
    let mut sc = Scratch::default();
    sc.reset(n, d);
    let rows: Vec<Vec<f32>> = (0..n).map(|_| (0..d).map(|_| r.normal() as f32 * 0.1).collect()).collect();
    sc.w.resize(n, 1.0);
    sc.wc.resize(n, 0.9);
    sc.put_all(n, d, |j| &rows[j]);
    let mut row: Vec<f32> = (0..d).map(|_| r.normal() as f32 * 0.1).collect();
    let c0 = thread_cpu_secs();
    for _ in 0..reps {
        coord_sweep(&mut row, n, &mut sc, &s, None, 1e-3, 0.01);
    }
    let t_sweep = (thread_cpu_secs() - c0) / reps as f64;
    assert!(row.iter().all(|v| v.is_finite()) && acc[0].is_finite());
    println!(
        "dim {d}: Gramian outer-product swap {:.2} us, coordinate sweep (history {n}) {:.2} us",
        t_outer * 1e6,
        t_sweep * 1e6
    );
}

/// Gramians computed from a copy are installed only if the model did not move meanwhile.
#[test]
fn exact_gramians_from_a_copy_install_only_when_current() {
    let mut m = streamed_model(cfg(), 200, 3);
    let stale = m.gramian_inputs();
    m.update(1, 2, 1.0, 1e6);
    assert!(!m.install_gramians(stale.compute()), "the model moved after the copy");
    let fresh = m.gramian_inputs().compute();
    assert!(m.install_gramians(fresh));
    let (ep, eq) = check_gramians(&mut m);
    assert!(ep < 1e-12 && eq < 1e-12, "{ep} {eq}");
}

/// Folding the popularity changes of a group (in row blocks on the thread pool) leaves `S~`
/// bit for bit as one `replace_outer` per item in order does, with any number of threads.
#[test]
fn fold_popularity_matches_one_update_per_item() {
    let build = || {
        let mut m = Mf::new(MfConfig { dim: 24, ..cfg() });
        for n in 0..4000u32 {
            m.update(n % 97, n * n % 400, 1.0, n as f64);
        }
        // Enough items for the thread pool to take the fold.
        let held: Vec<(u32, f64)> = (0..batch::PARALLEL_FROM as u32 + 100)
            .map(|i| {
                let held = m.record_event(1000 + i % 50, i, 1.0, 5000.0).unwrap();
                (i, held)
            })
            .collect();
        (m, held)
    };
    let (mut manual, held) = build();
    let d = manual.cfg.dim;
    for &(i, h) in &held {
        let a = manual.pop_w[i as usize];
        if a != h {
            let x: Vec<f64> = manual.item_vector(i).iter().map(|&v| v as f64).collect();
            kernels::replace_outer(&mut manual.st, d, a - h, &x, 0.0, &x);
        }
    }
    let bits = |m: &Mf| m.st.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for threads in [1, 4] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let (mut folded, same) = build();
        assert_eq!(same, held);
        pool.install(|| folded.fold_popularity(&held));
        assert_eq!(bits(&folded), bits(&manual), "{threads} thread(s)");
    }
}

#[test]
fn put_all_transposes_every_vector_whatever_the_block_remainder() {
    let d = 5;
    for n in [0, 1, 15, 16, 17, 37] {
        // Rows read as slices running on past their `dim` values, as the model's matrices are.
        let matrix: Vec<f32> = (0..(n + 1) * d).map(|x| x as f32).collect();
        let order: Vec<usize> = (0..n).map(|j| (j * 7) % n.max(1)).collect();
        let mut sc = Scratch::default();
        sc.reset(n, d);
        sc.put_all(n, d, |j| &matrix[order[j] * d..]);
        for j in 0..n {
            for f in 0..d {
                assert_eq!(sc.ot[f * n + j], matrix[order[j] * d + f], "n {n}, entry {j}, coordinate {f}");
            }
        }
        assert_eq!(sc.ot.len(), n * d);
    }
}
