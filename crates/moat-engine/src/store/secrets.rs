//! Server secrets: random values made once and kept for the life of the data dir.

use rusqlite::{OptionalExtension, params};

use super::error::{StoreError, StoreResult};
use super::{Store, now_ms};

/// Length of every secret, bytes.
pub const SECRET_BYTES: usize = 32;

impl Store {
    /// The secret called `name`, made (from the OS RNG) and recorded on first use.
    pub fn secret(&self, name: &str) -> StoreResult<[u8; SECRET_BYTES]> {
        self.write(|tx| {
            let found: Option<Vec<u8>> = tx
                .prepare_cached("SELECT value FROM secrets WHERE name = ?1")?
                .query_row([name], |row| row.get(0))
                .optional()?;
            if let Some(value) = found {
                return value.try_into().map_err(|v: Vec<u8>| {
                    StoreError::Corrupt(format!("secret {name:?} has {} bytes", v.len()))
                });
            }
            let mut value = [0u8; SECRET_BYTES];
            getrandom::fill(&mut value).map_err(StoreError::Random)?;
            tx.execute(
                "INSERT INTO secrets (name, value, created_at) VALUES (?1, ?2, ?3)",
                params![name, value.as_slice(), now_ms()],
            )?;
            Ok(value)
        })
    }

    /// A stable id of this store, and so of its data dir: 16 lowercase hex digits, made once.
    /// It names the owner of the sandboxes a server on this data dir keeps across restarts, so
    /// servers on other data dirs leave them alone.
    pub fn data_dir_id(&self) -> StoreResult<String> {
        let secret = self.secret(DATA_DIR_ID_SECRET)?;
        Ok(secret[..8].iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// The secret [`Store::data_dir_id`] is taken from (its own: it appears in files on the host).
const DATA_DIR_ID_SECRET: &str = "data-dir-id";
