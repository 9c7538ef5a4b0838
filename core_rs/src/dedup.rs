//! The redelivery window: event ids already applied, per producer, oldest forgotten first.
//!
//! A producer that resends after a lost acknowledgement sends the same `id` again; the engine
//! must apply it once. The window is bounded (a FIFO of the last `capacity` ids) and is part of
//! every snapshot, so it survives restarts exactly as the model does.
//!
//! Each id is kept with the user of its event, so erasing a user also forgets the ids of that
//! user's events ([`Dedup::forget_user`]): nothing the user did stays in memory or in the
//! snapshots written after the erasure.

use std::collections::{HashSet, VecDeque};

use crate::ids::ExtId;

type Key = (Box<str>, ExtId);

#[derive(Clone, Debug, Default)]
pub struct Dedup {
    capacity: usize,
    set: HashSet<Key>,
    /// Oldest first, each with the user of its event (None: read from a snapshot written
    /// before users were recorded; such ids can only age out).
    order: VecDeque<(Key, Option<ExtId>)>,
}

impl Dedup {
    pub fn new(capacity: usize) -> Self {
        Dedup { capacity, set: HashSet::new(), order: VecDeque::new() }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes the capacity; a smaller window forgets its oldest ids at once.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        while self.order.len() > capacity {
            if let Some((old, _)) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    /// Records `(producer, id)` of an event of `user`; false if it was already in the window
    /// (a duplicate).
    pub fn first_time(&mut self, producer: &str, id: &ExtId, user: Option<&ExtId>) -> bool {
        if self.capacity == 0 {
            return true;
        }
        let key: Key = (producer.into(), id.clone());
        if self.set.contains(&key) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some((old, _)) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(key.clone());
        self.order.push_back((key, user.cloned()));
        true
    }

    /// Forgets every id of `user`'s events (erasure); returns how many. One pass over the
    /// window: erasures are rare, and the window holds no per-user index that would cost
    /// memory on every event.
    pub fn forget_user(&mut self, user: &ExtId) -> usize {
        let before = self.order.len();
        let Dedup { set, order, .. } = self;
        order.retain(|(key, u)| {
            if u.as_ref() == Some(user) {
                set.remove(key);
                false
            } else {
                true
            }
        });
        before - self.order.len()
    }

    /// Window contents oldest first, each with its event's user, for snapshots.
    pub fn entries(&self) -> impl Iterator<Item = (&Key, Option<&ExtId>)> {
        self.order.iter().map(|(k, u)| (k, u.as_ref()))
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
        assert!(d.first_time("p", &a, None));
        assert!(!d.first_time("p", &a, None));
        assert!(d.first_time("q", &a, None), "another producer's id 1 is a different event");
        assert!(d.first_time("p", &b, None)); // evicts (p, 1)
        assert!(d.first_time("p", &c, None)); // evicts (q, 1)
        assert_eq!(d.len(), 2);
        assert!(!d.first_time("p", &c, None));
        assert!(d.first_time("p", &a, None), "an id older than the window is applied again");
        assert!(!d.first_time("p", &a, None));
    }

    #[test]
    fn forgetting_a_user_drops_only_their_ids() {
        let mut d = Dedup::new(10);
        let (alice, bob) = (ExtId::from_str("alice").unwrap(), ExtId::from_str("bob").unwrap());
        for n in 0..4 {
            let u = if n % 2 == 0 { &alice } else { &bob };
            assert!(d.first_time("p", &ExtId::Int(n), Some(u)));
        }
        assert_eq!(d.forget_user(&alice), 2);
        assert_eq!(d.len(), 2);
        assert!(d.entries().all(|(_, u)| u == Some(&bob)));
        assert!(d.first_time("p", &ExtId::Int(0), Some(&bob)), "the erased user's id is forgotten");
        assert!(!d.first_time("p", &ExtId::Int(1), Some(&bob)));
        assert_eq!(d.forget_user(&alice), 0);
    }

    #[test]
    fn shrinking_forgets_the_oldest() {
        let mut d = Dedup::new(4);
        for n in 0..4 {
            d.first_time("p", &ExtId::Int(n), None);
        }
        d.set_capacity(2);
        assert_eq!(d.len(), 2);
        assert!(d.first_time("p", &ExtId::Int(0), None));
        assert!(!d.first_time("p", &ExtId::Int(3), None));
    }
}
