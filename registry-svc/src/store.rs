//! Persistence in sled: one tree, keys `<kind>/<name>`, values JSON. Every
//! change is one atomic batch, flushed (fsynced) before it is acknowledged.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::RegistryError;

/// The kinds of record, each a key prefix.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Vm,
    Policy,
    Mapping,
    Group,
    Item,
    Agent,
    /// Counters that only grow (the last incarnation issued).
    Counter,
    /// Operator tokens, by name.
    Token,
    /// Facts kept once and never undone (a bootstrap token was installed).
    Marker,
    /// A VM's outstanding agent enrollment token, by VM.
    Enrollment,
    /// A region's own services, by region.
    Region,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Vm => "vm/",
            Kind::Policy => "policy/",
            Kind::Mapping => "mapping/",
            Kind::Group => "group/",
            Kind::Item => "item/",
            Kind::Agent => "agent/",
            Kind::Counter => "counter/",
            Kind::Token => "token/",
            Kind::Marker => "marker/",
            Kind::Enrollment => "enroll/",
            Kind::Region => "region/",
        }
    }

    fn key(self, name: &str) -> String {
        format!("{}{name}", self.prefix())
    }
}

/// The registry's database; clones share it.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
}

/// Writes to apply together.
#[derive(Default)]
pub struct Writes {
    batch: sled::Batch,
    empty: bool,
}

impl Writes {
    pub fn new() -> Self {
        Writes {
            batch: sled::Batch::default(),
            empty: true,
        }
    }

    /// Stores `value` as `kind/name`.
    pub fn put<T: Serialize>(
        &mut self,
        kind: Kind,
        name: &str,
        value: &T,
    ) -> Result<(), RegistryError> {
        let bytes = serde_json::to_vec(value).map_err(|e| RegistryError::Corrupt {
            key: kind.key(name),
            message: e.to_string(),
        })?;
        self.batch.insert(kind.key(name).as_bytes(), bytes);
        self.empty = false;
        Ok(())
    }

    /// Removes `kind/name`.
    pub fn remove(&mut self, kind: Kind, name: &str) {
        self.batch.remove(kind.key(name).as_bytes());
        self.empty = false;
    }
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

impl Store {
    /// Opens (or creates) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Store, RegistryError> {
        let db = sled::Config::new().path(dir.join("registry.sled")).open()?;
        let tree = db.open_tree("registry")?;
        Ok(Store { db, tree })
    }

    /// One record, if present.
    pub fn get<T: DeserializeOwned>(
        &self,
        kind: Kind,
        name: &str,
    ) -> Result<Option<T>, RegistryError> {
        let key = kind.key(name);
        match self.tree.get(key.as_bytes())? {
            Some(bytes) => Ok(Some(decode(key.as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    /// Every record of a kind, in key order.
    pub fn list<T: DeserializeOwned>(&self, kind: Kind) -> Result<Vec<T>, RegistryError> {
        self.tree
            .scan_prefix(kind.prefix().as_bytes())
            .map(|entry| {
                let (key, bytes) = entry?;
                decode(&key, &bytes)
            })
            .collect()
    }

    /// Applies `writes` atomically and waits until they are on disk.
    pub async fn commit(&self, writes: Writes) -> Result<(), RegistryError> {
        if writes.empty {
            return Ok(());
        }
        self.tree.apply_batch(writes.batch)?;
        self.db.flush_async().await?;
        Ok(())
    }
}
