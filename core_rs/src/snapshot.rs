//! Snapshots of the whole model: one file, written atomically.
//!
//! # Format (little-endian)
//! ```text
//! magic  b"RSSNAP\0\0"        8 bytes
//! version u32                 FORMAT_VERSION
//! wal_seq u64                 the last journal record the snapshot reflects
//! log_position len u64, bytes the shared log's position the snapshot reflects, opaque here
//!                             (empty for the local journal; since version 4)
//! body                        config, ids, factorization, trending, item attributes,
//!                             seen sets, redelivery window (each id with its event's
//!                             user, since version 3), counters, index
//!                             (attribute vectors, cold and fresh sets are derived on load)
//! crc32  u32                  over every byte before it
//! ```
//! The state is copied to memory under its read lock (a memory-speed pause for writers, no
//! checksum or disk work in it), the index under its own read lock after the state lock is
//! released; the checksum and the write happen without any lock: temp file, fsync, rename
//! over the target, fsync the directory. A reader therefore sees the old snapshot or the new
//! one, never a torn file. Version 2 files (ids without users) and version 3 files (no log
//! position: they load with an empty one) are still read.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

use crate::codec::*;
use crate::decode::Limits;
use crate::dedup::Dedup;
use crate::hnsw::{Hnsw, HnswConfig};
use crate::ids::{ExtId, IdMap};
use crate::mf::Mf;
use crate::model::{Config, Dirty, ItemMeta, Model, State};
use crate::trending::Trending;

pub const MAGIC: &[u8; 8] = b"RSSNAP\0\0";
pub const FORMAT_VERSION: u32 = 4;
/// Largest log position accepted when loading: a position names one stream id per partition,
/// so a few kilobytes is generous; a larger length means a damaged file.
pub const MAX_LOG_POSITION_BYTES: usize = 1 << 20;
/// The oldest format this build reads: version 2 lacks the users of the redelivery window.
const OLDEST_READABLE: u32 = 2;

fn put_ext(w: &mut dyn Write, e: Option<&ExtId>) -> io::Result<()> {
    match e {
        None => put_u8(w, 0),
        Some(ExtId::Int(i)) => {
            put_u8(w, 1)?;
            put_i64(w, *i)
        }
        Some(ExtId::Str(s)) => {
            put_u8(w, 2)?;
            put_str(w, s)
        }
    }
}

fn get_ext(r: &mut dyn Read) -> io::Result<Option<ExtId>> {
    match get_u8(r)? {
        0 => Ok(None),
        1 => Ok(Some(ExtId::Int(get_i64(r)?))),
        2 => Ok(Some(ExtId::from_str(&get_str(r, crate::ids::MAX_ID_BYTES as u64)?).map_err(invalid)?)),
        t => Err(invalid(format!("unknown id tag {t}"))),
    }
}

fn put_idmap(w: &mut dyn Write, m: &IdMap) -> io::Result<()> {
    put_len(w, m.slots().len())?;
    for s in m.slots() {
        put_ext(w, s.as_ref())?;
    }
    Ok(())
}

fn get_idmap(r: &mut dyn Read) -> io::Result<IdMap> {
    let n = get_len(r, u32::MAX as u64)?;
    let mut slots = Vec::with_capacity(n.min(1 << 20));
    for _ in 0..n {
        slots.push(get_ext(r)?);
    }
    Ok(IdMap::from_slots(slots))
}

fn put_u32s(w: &mut dyn Write, v: &[u32]) -> io::Result<()> {
    put_len(w, v.len())?;
    v.iter().try_for_each(|x| put_u32(w, *x))
}

fn get_u32s(r: &mut dyn Read) -> io::Result<Vec<u32>> {
    let n = get_len(r, u32::MAX as u64)?;
    let mut v = Vec::with_capacity(n.min(1 << 20));
    for _ in 0..n {
        v.push(get_u32(r)?);
    }
    Ok(v)
}

fn put_config(w: &mut dyn Write, c: &Config) -> io::Result<()> {
    put_len(w, c.event_weights.len())?;
    for (name, weight) in &c.event_weights {
        put_str(w, name)?;
        put_f32(w, *weight)?;
    }
    put_f32(w, c.default_weight)?;
    put_f64(w, c.trending_half_life)?;
    put_len(w, c.exact_below)?;
    put_len(w, c.dedup_window)?;
    put_u8(w, c.auto_reindex as u8)?;
    let l = &c.limits;
    for n in [l.max_frame_bytes, l.max_entries, l.max_array, l.max_map, l.max_str, l.max_decompressed_bytes] {
        put_len(w, n)?;
    }
    let h = &c.hnsw;
    for n in [h.m, h.ef_construction, h.ef_search] {
        put_len(w, n)?;
    }
    put_u64(w, h.seed)?;
    put_f32(w, c.cold_start_events)?;
    put_f32(w, c.diversity)?;
    put_f32(w, c.exploration)?;
    put_u32(w, c.explore_max_events)
}

fn get_config(r: &mut dyn Read, mf: crate::mf::MfConfig) -> io::Result<Config> {
    let n = get_len(r, 1 << 16)?;
    let mut event_weights = Vec::with_capacity(n);
    for _ in 0..n {
        event_weights.push((get_str(r, 1 << 10)?, get_f32(r)?));
    }
    let default_weight = get_f32(r)?;
    let trending_half_life = get_f64(r)?;
    let exact_below = get_len(r, u64::MAX)?;
    let dedup_window = get_len(r, 1 << 32)?;
    let auto_reindex = get_u8(r)? != 0;
    let mut l = [0usize; 6];
    for x in &mut l {
        *x = get_len(r, u64::MAX)?;
    }
    let limits = Limits {
        max_frame_bytes: l[0],
        max_entries: l[1],
        max_array: l[2],
        max_map: l[3],
        max_str: l[4],
        max_decompressed_bytes: l[5],
    };
    let (m, ef_construction, ef_search) = (get_len(r, 1 << 12)?, get_len(r, 1 << 20)?, get_len(r, 1 << 20)?);
    let hnsw = HnswConfig { m, ef_construction, ef_search, seed: get_u64(r)? };
    let unit = |x: f32, what: &str| {
        if (0.0..=1.0).contains(&x) {
            Ok(x)
        } else {
            Err(invalid(format!("{what} {x} is outside [0, 1]")))
        }
    };
    let cold_start_events = get_f32(r)?;
    if !(cold_start_events.is_finite() && cold_start_events >= 0.0) {
        return Err(invalid("cold_start_events is not a finite number ≥ 0"));
    }
    let diversity = unit(get_f32(r)?, "diversity")?;
    let exploration = unit(get_f32(r)?, "exploration")?;
    let explore_max_events = get_u32(r)?;
    Ok(Config {
        mf,
        hnsw,
        event_weights,
        default_weight,
        trending_half_life,
        // Not saved: a policy of the server that loads the snapshot, not part of the model.
        max_clock_skew: crate::model::DEFAULT_MAX_CLOCK_SKEW,
        exact_below,
        dedup_window,
        auto_reindex,
        limits,
        cold_start_events,
        diversity,
        exploration,
        explore_max_events,
        // Not stored: the neighbourhood settings come from the defaults.
        ..Config::default()
    })
}

impl Model {
    /// Serialises the model, with `wal_seq` (the last journal record it reflects) and an empty
    /// log position, to bytes.
    pub fn snapshot_bytes(&self, wal_seq: u64) -> io::Result<Vec<u8>> {
        self.snapshot_bytes_at(wal_seq, &[])
    }

    /// Serialises the model with `wal_seq` and `log_position` (the shared log's own position
    /// of the same record, opaque to the model) to bytes.
    pub fn snapshot_bytes_at(&self, wal_seq: u64, log_position: &[u8]) -> io::Result<Vec<u8>> {
        if log_position.len() > MAX_LOG_POSITION_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("log position of {} bytes, at most {MAX_LOG_POSITION_BYTES}", log_position.len()),
            ));
        }
        let mut w: Vec<u8> = Vec::new();
        w.write_all(MAGIC)?;
        put_u32(&mut w, FORMAT_VERSION)?;
        put_u64(&mut w, wal_seq)?;
        put_len(&mut w, log_position.len())?;
        w.write_all(log_position)?;
        {
            let st = self.state.read();
            st.mf.save(&mut w)?;
            put_config(&mut w, &self.cfg)?;
            put_idmap(&mut w, &st.users)?;
            put_idmap(&mut w, &st.items)?;
            put_idmap(&mut w, &st.categories)?;
            put_idmap(&mut w, &st.tags)?;
            st.trending.save(&mut w)?;
            put_len(&mut w, st.meta.len())?;
            for m in &st.meta {
                put_u32(&mut w, m.category.unwrap_or(u32::MAX))?;
                put_u32s(&mut w, &m.tags)?;
                put_u8(&mut w, m.available as u8)?;
            }
            put_len(&mut w, st.seen.len())?;
            for s in &st.seen {
                put_u32s(&mut w, s)?;
            }
            put_len(&mut w, st.dedup.capacity())?;
            put_len(&mut w, st.dedup.len())?;
            for ((producer, id), user) in st.dedup.entries() {
                put_str(&mut w, producer)?;
                put_ext(&mut w, Some(id))?;
                put_ext(&mut w, user)?;
            }
            for c in [st.events_applied, st.duplicates, st.rejected] {
                put_u64(&mut w, c)?;
            }
            put_f64(&mut w, st.newest_ts)?;
            // Items still waiting for the index (those being re-linked included: they stay
            // listed until done) are re-linked after load. The index copied below may already
            // have some of them; re-linking those again is harmless.
            put_u32s(&mut w, &self.dirty.lock().pending())?;
        }
        self.index.read().save(&mut w)?;
        let crc = crc32fast::hash(&w);
        w.extend_from_slice(&crc.to_le_bytes());
        Ok(w)
    }

    /// Writes a snapshot to `path` atomically (temp file, fsync, rename, fsync directory).
    pub fn save(&self, path: &Path, wal_seq: u64, log_position: &[u8]) -> io::Result<()> {
        let bytes = self.snapshot_bytes_at(wal_seq, log_position)?;
        write_atomically(path, &bytes)
    }

    /// Restores a model from snapshot bytes; returns it and the journal position it reflects.
    pub fn from_snapshot_bytes(bytes: &[u8]) -> io::Result<(Model, u64)> {
        Self::from_snapshot_bytes_with(bytes, None)
    }

    /// [`Model::from_snapshot_bytes`], then `config` applied where a restart may change it
    /// ([`Config::reconciled`], [`crate::mf::Mf::reconfigure`]); a setting that cannot change
    /// gives `InvalidInput` naming it.
    pub fn from_snapshot_bytes_with(bytes: &[u8], config: Option<&Config>) -> io::Result<(Model, u64)> {
        Self::from_snapshot_bytes_at(bytes, config).map(|(model, at)| (model, at.wal_seq))
    }

    /// [`Model::from_snapshot_bytes_with`], returning both positions the snapshot reflects.
    pub fn from_snapshot_bytes_at(bytes: &[u8], config: Option<&Config>) -> io::Result<(Model, SnapshotAt)> {
        if bytes.len() < MAGIC.len() + 4 + 8 + 4 {
            return Err(invalid("snapshot is truncated"));
        }
        if &bytes[..8] != MAGIC {
            return Err(invalid("not a recstream snapshot (bad magic)"));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes(tail.try_into().expect("4 bytes"));
        if crc32fast::hash(body) != stored {
            return Err(invalid("snapshot checksum mismatch (file damaged)"));
        }
        let r = &mut &body[8..];
        let version = get_u32(r)?;
        if !(OLDEST_READABLE..=FORMAT_VERSION).contains(&version) {
            return Err(invalid(format!(
                "snapshot format version {version}, this build reads {OLDEST_READABLE} to {FORMAT_VERSION}"
            )));
        }
        let wal_seq = get_u64(r)?;
        let log_position = if version >= 4 {
            let n = get_len(r, MAX_LOG_POSITION_BYTES as u64)?;
            let mut p = vec![0u8; n];
            r.read_exact(&mut p)?;
            p
        } else {
            Vec::new()
        };
        let mut mf = Mf::load(r)?;
        let mut cfg = get_config(r, mf.config().clone())?;
        if let Some(wanted) = config {
            let refused = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
            let reconciled = cfg.reconciled(wanted).map_err(refused)?;
            mf.reconfigure(wanted.mf.clone()).map_err(refused)?;
            cfg = reconciled;
        }
        let users = get_idmap(r)?;
        let items = get_idmap(r)?;
        let categories = get_idmap(r)?;
        let tags = get_idmap(r)?;
        let trending = Trending::load(r)?;
        let n = get_len(r, u32::MAX as u64)?;
        let mut meta = Vec::with_capacity(n.min(1 << 20));
        for _ in 0..n {
            let c = get_u32(r)?;
            let tags = get_u32s(r)?;
            let available = get_u8(r)? != 0;
            meta.push(ItemMeta { category: (c != u32::MAX).then_some(c), tags, available });
        }
        let n = get_len(r, u32::MAX as u64)?;
        let mut seen = Vec::with_capacity(n.min(1 << 20));
        for _ in 0..n {
            seen.push(get_u32s(r)?);
        }
        let mut dedup = Dedup::new(get_len(r, 1 << 32)?);
        for _ in 0..get_len(r, 1 << 32)? {
            let producer = get_str(r, 1 << 10)?;
            let id = get_ext(r)?.ok_or_else(|| invalid("empty id in redelivery window"))?;
            let user = if version >= 3 { get_ext(r)? } else { None };
            dedup.first_time(&producer, &id, user.as_ref());
        }
        dedup.set_capacity(cfg.dedup_window);
        let (events_applied, duplicates, rejected) = (get_u64(r)?, get_u64(r)?, get_u64(r)?);
        let newest_ts = get_f64(r)?;
        let pending = get_u32s(r)?;
        let index = Hnsw::load(r)?;
        if !r.is_empty() {
            return Err(invalid(format!("{} unexpected bytes after the index", r.len())));
        }
        if meta.len() != items.capacity() || seen.len() != users.capacity() {
            return Err(invalid("snapshot sections disagree on the number of users or items"));
        }
        let mut dirty = Dirty::default();
        for i in pending {
            dirty.mark(i);
        }
        let mut state = State {
            users,
            items,
            mf,
            trending,
            meta,
            categories,
            tags,
            seen,
            attrs: crate::coldstart::AttrVectors::new(cfg.mf.dim),
            cold: Default::default(),
            cold_cursor: 0,
            cold_pass_version: 0,
            fresh: Default::default(),
            dedup,
            events_applied,
            duplicates,
            rejected,
            newest_ts,
            neighbours: crate::neighbours::Neighbours::new(cfg.neighbour_cap, cfg.neighbour_window),
        };
        // Attribute sums, cold and fresh sets are derived from what was loaded.
        for i in state.rebuild_derived(&cfg) {
            dirty.mark(i);
        }
        Ok((Model::assemble(cfg, state, index, dirty), SnapshotAt { wal_seq, log_position }))
    }

    /// Loads a snapshot file; with `config`, as [`Model::from_snapshot_bytes_with`].
    pub fn load(path: &Path, config: Option<&Config>) -> io::Result<(Model, SnapshotAt)> {
        let mut bytes = Vec::new();
        File::open(path)?.read_to_end(&mut bytes)?;
        Self::from_snapshot_bytes_at(&bytes, config)
    }
}

/// Where in the event stream a snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotAt {
    /// The last local journal record the snapshot reflects (the node's own numbering).
    pub wal_seq: u64,
    /// The shared log's position of that record (opaque here; empty for the local journal and
    /// for files older than version 4).
    pub log_position: Vec<u8>,
}

/// Replaces `path` with `bytes` so that a crash at any moment leaves the old file or the new.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().ok_or_else(|| invalid("snapshot path has no file name"))?.to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_with_events() -> Model {
        let m = Model::new(Config::default());
        let ev = |u: i64, i: i64| crate::decode::Record::Interaction {
            user: ExtId::Int(u),
            item: ExtId::Int(i),
            kind: None,
            weight: Some(1.0),
            id: Some(ExtId::Int(u * 100 + i)),
            ts: 1.7e9,
        };
        m.apply(&[ev(1, 2), ev(1, 3), ev(2, 3)], "p");
        m
    }

    /// The log position goes in and comes back byte for byte, beside `wal_seq`.
    #[test]
    fn log_position_round_trips() {
        let m = model_with_events();
        let position = b"\x81\xa2p0\xa5123-4".to_vec();
        let bytes = m.snapshot_bytes_at(42, &position).unwrap();
        let (_, at) = Model::from_snapshot_bytes_at(&bytes, None).unwrap();
        assert_eq!(at, SnapshotAt { wal_seq: 42, log_position: position });
        let (_, at) = Model::from_snapshot_bytes_at(&m.snapshot_bytes(5).unwrap(), None).unwrap();
        assert_eq!(at, SnapshotAt { wal_seq: 5, log_position: Vec::new() });
    }

    /// A version 3 file (no position field) still loads, with an empty position.
    #[test]
    fn version_3_files_load_with_an_empty_position() {
        let m = model_with_events();
        let v4 = m.snapshot_bytes_at(9, b"").unwrap();
        // Version 3 is version 4 without the (here empty) position: drop its 8-byte length.
        let header = MAGIC.len() + 4 + 8;
        let mut v3 = v4[..header].to_vec();
        v3[8..12].copy_from_slice(&3u32.to_le_bytes());
        v3.extend_from_slice(&v4[header + 8..v4.len() - 4]);
        let crc = crc32fast::hash(&v3);
        v3.extend_from_slice(&crc.to_le_bytes());
        let (_, at) = Model::from_snapshot_bytes_at(&v3, None).unwrap();
        assert_eq!(at, SnapshotAt { wal_seq: 9, log_position: Vec::new() });
    }

    /// An oversized position is refused when writing and a damaged length when reading.
    #[test]
    fn oversized_positions_are_refused() {
        let m = model_with_events();
        let err = m.snapshot_bytes_at(1, &vec![0; MAX_LOG_POSITION_BYTES + 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let mut bytes = m.snapshot_bytes_at(1, b"ab").unwrap();
        let at = MAGIC.len() + 4 + 8;
        bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let n = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..n]);
        bytes[n..].copy_from_slice(&crc.to_le_bytes());
        assert!(Model::from_snapshot_bytes_at(&bytes, None).is_err());
    }
}
