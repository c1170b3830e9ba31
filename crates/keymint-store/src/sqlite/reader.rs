//! The read pool: a few read-only connections, used on the blocking thread
//! pool, never on the async workers.

use std::path::PathBuf;
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags};

use crate::Result;

pub(super) const READERS: usize = 4;

#[derive(Debug)]
pub(super) struct ReadPool {
    pub(super) path: PathBuf,
    pub(super) idle: Mutex<Vec<Connection>>,
}

impl ReadPool {
    fn open(&self) -> Result<Connection> {
        let c = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        c.busy_timeout(std::time::Duration::from_secs(5))?;
        c.set_prepared_statement_cache_capacity(64);
        Ok(c)
    }

    pub(super) fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = match self.idle.lock() {
            Ok(mut idle) => idle.pop(),
            Err(_) => None,
        };
        let conn = match conn {
            Some(c) => c,
            None => self.open()?,
        };
        let r = f(&conn);
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < READERS
        {
            idle.push(conn);
        }
        r
    }
}
