//! How many connections each uid holds on a socket, bounded: every
//! connection is attested (its executable hashed, up to its size limit),
//! so one uid allowed on the socket must not be able to hold all of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Connections held per uid.
#[derive(Debug, Default)]
pub struct UidSlots(Mutex<HashMap<u32, usize>>);

/// One uid's slot, held as long as its connection; released when dropped.
#[derive(Debug)]
pub struct UidSlot {
    table: Arc<UidSlots>,
    uid: u32,
}

impl UidSlots {
    /// A slot for `uid`, unless it already holds `max`.
    pub fn take(self: &Arc<Self>, uid: u32, max: usize) -> Option<UidSlot> {
        let mut t = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = t.entry(uid).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(UidSlot {
            table: Arc::clone(self),
            uid,
        })
    }

    /// The slots `uid` holds.
    pub fn held(&self, uid: u32) -> usize {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&uid)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut t = self
            .table
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = t.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_uid_holds_at_most_its_share_and_gets_it_back() {
        let slots = Arc::new(UidSlots::default());
        let held: Vec<UidSlot> = (0..3).map(|_| slots.take(1000, 3).unwrap()).collect();
        assert!(slots.take(1000, 3).is_none());
        // Another uid is not held back by the first.
        let other = slots.take(1001, 3).unwrap();
        assert_eq!((slots.held(1000), slots.held(1001)), (3, 1));
        drop(other);
        drop(held);
        assert_eq!(slots.held(1000), 0);
        assert!(slots.take(1000, 3).is_some());
    }
}
