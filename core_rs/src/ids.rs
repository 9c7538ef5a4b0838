//! External ids (strings or integers, as producers send them) mapped to dense `u32` ids.
//!
//! Dense ids index the factor matrices and the HNSW graph directly. An erased user's dense id
//! is never reused: its slot keeps a tombstone so nothing stale can be attributed to a newcomer.

use std::collections::HashMap;
use std::fmt;

/// Longest string id accepted, in bytes. Longer ids are rejected rather than truncated:
/// truncation would silently merge distinct users.
pub const MAX_ID_BYTES: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExtId {
    Int(i64),
    Str(Box<str>),
}

impl ExtId {
    /// Validates a string id: non-empty, at most [`MAX_ID_BYTES`].
    #[allow(clippy::should_implement_trait)] // fallible with a String reason, used everywhere
    pub fn from_str(s: &str) -> Result<ExtId, String> {
        if s.is_empty() {
            return Err("id is an empty string".into());
        }
        if s.len() > MAX_ID_BYTES {
            return Err(format!("id is {} bytes, the limit is {MAX_ID_BYTES}", s.len()));
        }
        Ok(ExtId::Str(s.into()))
    }
}

impl fmt::Display for ExtId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExtId::Int(i) => write!(f, "{i}"),
            ExtId::Str(s) => f.write_str(s),
        }
    }
}

/// Bidirectional map; dense ids are assigned in arrival order starting at 0.
#[derive(Default, Clone, Debug)]
pub struct IdMap {
    to_dense: HashMap<ExtId, u32>,
    /// `None` marks an erased id (tombstone).
    to_ext: Vec<Option<ExtId>>,
}

impl IdMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, id: &ExtId) -> Option<u32> {
        self.to_dense.get(id).copied()
    }

    /// Dense id for `id`, assigning the next one if it is new. The bool says whether it was new.
    pub fn get_or_insert(&mut self, id: &ExtId) -> (u32, bool) {
        if let Some(&d) = self.to_dense.get(id) {
            return (d, false);
        }
        let d = u32::try_from(self.to_ext.len()).expect("more than 2^32 ids");
        self.to_dense.insert(id.clone(), d);
        self.to_ext.push(Some(id.clone()));
        (d, true)
    }

    pub fn ext(&self, dense: u32) -> Option<&ExtId> {
        self.to_ext.get(dense as usize).and_then(|e| e.as_ref())
    }

    /// Forgets `id`; its dense slot becomes a tombstone. Returns the dense id it had.
    pub fn erase(&mut self, id: &ExtId) -> Option<u32> {
        let d = self.to_dense.remove(id)?;
        self.to_ext[d as usize] = None;
        Some(d)
    }

    /// Number of dense slots, tombstones included (the size the matrices must have).
    pub fn capacity(&self) -> usize {
        self.to_ext.len()
    }

    /// Number of live ids.
    pub fn len(&self) -> usize {
        self.to_dense.len()
    }

    pub fn is_empty(&self) -> bool {
        self.to_dense.is_empty()
    }

    /// Slots in dense order, for snapshots.
    pub fn slots(&self) -> &[Option<ExtId>] {
        &self.to_ext
    }

    /// Rebuilds a map from its slots (the inverse of [`IdMap::slots`]).
    pub fn from_slots(slots: Vec<Option<ExtId>>) -> Self {
        let mut to_dense = HashMap::with_capacity(slots.len());
        for (d, s) in slots.iter().enumerate() {
            if let Some(e) = s {
                to_dense.insert(e.clone(), d as u32);
            }
        }
        IdMap { to_dense, to_ext: slots }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_ids_in_arrival_order_and_erase_leaves_tombstone() {
        let mut m = IdMap::new();
        let a = ExtId::from_str("alice").unwrap();
        let b = ExtId::Int(42);
        assert_eq!(m.get_or_insert(&a), (0, true));
        assert_eq!(m.get_or_insert(&b), (1, true));
        assert_eq!(m.get_or_insert(&a), (0, false));
        assert_eq!(m.erase(&a), Some(0));
        assert_eq!(m.get(&a), None);
        assert_eq!(m.ext(0), None);
        assert_eq!(m.get_or_insert(&a), (2, true));
        assert_eq!(m.capacity(), 3);
        assert_eq!(m.len(), 2);
        let back = IdMap::from_slots(m.slots().to_vec());
        assert_eq!(back.get(&a), Some(2));
        assert_eq!(back.get(&b), Some(1));
    }

    #[test]
    fn string_ids_are_validated() {
        assert!(ExtId::from_str("").is_err());
        assert!(ExtId::from_str(&"x".repeat(MAX_ID_BYTES)).is_ok());
        assert!(ExtId::from_str(&"x".repeat(MAX_ID_BYTES + 1)).is_err());
        // Int 1 and Str "1" are different ids: producers that mix them get what they sent.
        assert_ne!(ExtId::Int(1), ExtId::from_str("1").unwrap());
    }
}
