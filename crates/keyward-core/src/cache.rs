//! Read-through caches for the hot path (resolve): agents by token hash,
//! secrets with their current version, grants, and unwrapped org data keys.
//! Never a decrypted value, never keyed by a raw token.
//!
//! Invalidation uses a generation counter: a filler records the generation
//! before reading the store and may insert only if no change happened since,
//! so a read that raced a write can never re-insert stale data.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use crate::crypto::KeyMaterial;
use crate::model::{Agent, AgentToken, Grant, Secret, SecretVersion};

/// Above this many entries a map is cleared rather than grown (bounds memory
/// against callers probing many names).
const MAX_ENTRIES: usize = 20_000;
/// Backstop for a replica whose change notifications silently stopped
/// (half-open connection): no entry is trusted for longer than this.
const MAX_AGE: Duration = Duration::from_secs(15);

struct Gen<K, V> {
    generation: u64,
    map: HashMap<K, (V, Instant)>,
}

pub(crate) struct CacheMap<K, V>(RwLock<Gen<K, V>>);

impl<K: Eq + Hash, V: Clone> CacheMap<K, V> {
    fn new() -> Self {
        Self(RwLock::new(Gen { generation: 0, map: HashMap::new() }))
    }

    /// Returns the value, or the generation to pass to [`Self::fill`].
    pub(crate) fn get(&self, k: &K) -> Result<V, u64> {
        let g = self.0.read().unwrap_or_else(|e| e.into_inner());
        match g.map.get(k) {
            Some((v, at)) if at.elapsed() < MAX_AGE => Ok(v.clone()),
            _ => Err(g.generation),
        }
    }

    pub(crate) fn fill(&self, generation: u64, k: K, v: V) {
        let mut g = self.0.write().unwrap_or_else(|e| e.into_inner());
        if g.generation != generation {
            return;
        }
        if g.map.len() >= MAX_ENTRIES {
            g.map.clear();
        }
        g.map.insert(k, (v, Instant::now()));
    }

    fn invalidate(&self) {
        let mut g = self.0.write().unwrap_or_else(|e| e.into_inner());
        g.generation += 1;
        g.map.clear();
    }
}

pub(crate) type CachedSecret = (Secret, Option<SecretVersion>);

pub(crate) struct Cache {
    pub(crate) agents: CacheMap<[u8; 32], (Agent, AgentToken)>,
    pub(crate) secrets: CacheMap<(String, String), CachedSecret>,
    pub(crate) grants: CacheMap<(String, String), Option<Grant>>,
    pub(crate) data_keys: CacheMap<String, Arc<KeyMaterial>>,
}

impl Cache {
    pub(crate) fn new() -> Self {
        Self { agents: CacheMap::new(), secrets: CacheMap::new(), grants: CacheMap::new(), data_keys: CacheMap::new() }
    }

    /// Called after every committed change to agents, secrets or grants.
    pub(crate) fn invalidate_policy(&self) {
        self.agents.invalidate();
        self.secrets.invalidate();
        self.grants.invalidate();
    }

    /// Called when the vault is sealed again or the master key changes.
    #[allow(dead_code)]
    pub(crate) fn invalidate_all(&self) {
        self.invalidate_policy();
        self.data_keys.invalidate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_fill_after_invalidation_is_dropped() {
        let c: CacheMap<u8, u8> = CacheMap::new();
        let generation = c.get(&1).unwrap_err();
        c.invalidate(); // a write committed while the reader was at the store
        c.fill(generation, 1, 42);
        assert!(c.get(&1).is_err());
        let generation = c.get(&1).unwrap_err();
        c.fill(generation, 1, 43);
        assert_eq!(c.get(&1), Ok(43));
    }
}
