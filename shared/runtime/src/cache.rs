//! A bounded, time-limited cache for reads of other services' data on hot paths, on `moka`:
//! entries expire `ttl` after they were written, and past `capacity` the least used go first (a
//! full cache is not dropped whole). Reads that must not stampede (many waiting for one load) use
//! `moka::future::Cache::try_get_with` directly, as `api_keys` and Handoff's upstream do.

use std::{hash::Hash, time::Duration};

/// Entries live for `ttl`; a stale entry is never returned.
#[derive(Clone)]
pub struct TtlCache<K, V> {
    entries: moka::sync::Cache<K, V>,
}

impl<K, V> std::fmt::Debug for TtlCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtlCache").finish_non_exhaustive()
    }
}

impl<K, V> TtlCache<K, V>
where
    K: Eq + Hash + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity as u64)
                .time_to_live(ttl)
                .build(),
        }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        self.entries.get(key)
    }

    pub fn remove(&self, key: &K) {
        self.entries.invalidate(key);
    }

    pub fn clear(&self) {
        self.entries.invalidate_all();
    }

    pub fn insert(&self, key: K, value: V) {
        self.entries.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_kept_for_its_ttl_only() {
        let cache = TtlCache::new(Duration::from_millis(50), 10);
        cache.insert("a", 1);
        assert_eq!(cache.get(&"a"), Some(1));
        cache.remove(&"a");
        assert_eq!(cache.get(&"a"), None);
        cache.insert("b", 2);
        assert_eq!(cache.get(&"b"), Some(2));
        let written = std::time::Instant::now();
        // moka reads its own clock: wait on the condition, with a deadline.
        while cache.get(&"b").is_some() {
            assert!(written.elapsed() < Duration::from_secs(5), "never expired");
            std::thread::yield_now();
        }
    }
}
