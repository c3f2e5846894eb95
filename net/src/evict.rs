//! Places that a listener can take back from their oldest holder when every
//! place is taken: the budget of connections that have not proved who they
//! are yet (TLS handshakes, anonymous calls). An attacker who holds them
//! open from many addresses then only pushes out its own older connections,
//! while a real client's handshake, a few milliseconds old, survives unless
//! a whole budget's worth of newer connections arrives within it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// The holders of a limit's places, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Holders {
    next: u64,
    held: BTreeMap<u64, CancellationToken>,
}

pub(crate) type Table = Arc<Mutex<Holders>>;

/// A place's entry in its limit's table; leaves it when dropped.
#[derive(Debug)]
pub(crate) struct Entry {
    id: u64,
    pub(crate) token: CancellationToken,
    table: Table,
}

impl Entry {
    pub(crate) fn new(table: &Table) -> Self {
        let token = CancellationToken::new();
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        let id = t.next;
        t.next += 1;
        t.held.insert(id, token.clone());
        Self { id, token, table: table.clone() }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).held.remove(&self.id);
    }
}

/// Tells the oldest holder to let its place go; false if there is none.
pub(crate) fn evict_oldest(table: &Table) -> bool {
    let oldest = table.lock().unwrap_or_else(|p| p.into_inner()).held.pop_first();
    oldest.map(|(_, token)| token.cancel()).is_some()
}
