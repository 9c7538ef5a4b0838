//! The redelivery window: event ids already applied, per producer, oldest forgotten first.
//!
//! A producer that resends after a lost acknowledgement sends the same `id` again; the engine
//! must apply it once. The window is bounded (a FIFO of the last `capacity` ids) and is part of
//! every snapshot, so it survives restarts exactly as the model does.

use std::collections::{HashSet, VecDeque};

use crate::ids::ExtId;

type Key = (Box<str>, ExtId);

#[derive(Clone, Debug, Default)]
pub struct Dedup {
    capacity: usize,
    set: HashSet<Key>,
    order: VecDeque<Key>,
}

impl Dedup {
    pub fn new(capacity: usize) -> Self {
        Dedup { capacity, set: HashSet::new(), order: VecDeque::new() }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Records `(producer, id)`; false if it was already in the window (a duplicate).
    pub fn first_time(&mut self, producer: &str, id: &ExtId) -> bool {
        if self.capacity == 0 {
            return true;
        }
        let key: Key = (producer.into(), id.clone());
        if self.set.contains(&key) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(key.clone());
        self.order.push_back(key);
        true
    }

    /// Window contents oldest first, for snapshots.
    pub fn entries(&self) -> impl Iterator<Item = &Key> {
        self.order.iter()
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_within_window_only_and_per_producer() {
        let mut d = Dedup::new(2);
        let a = ExtId::Int(1);
        let b = ExtId::Int(2);
        let c = ExtId::Int(3);
        assert!(d.first_time("p", &a));
        assert!(!d.first_time("p", &a));
        assert!(d.first_time("q", &a), "another producer's id 1 is a different event");
        assert!(d.first_time("p", &b)); // evicts (p, 1)
        assert!(d.first_time("p", &c)); // evicts (q, 1)
        assert_eq!(d.len(), 2);
        assert!(!d.first_time("p", &c));
        assert!(d.first_time("p", &a), "an id older than the window is applied again");
        assert!(!d.first_time("p", &a));
    }
}
