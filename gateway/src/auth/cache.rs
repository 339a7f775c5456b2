//! Cache of verified tokens, so that a client repeating its bearer token pays a hash and a lookup
//! instead of a signature check.
//!
//! Keyed by SHA-256 of the token: collision-resistant, so one token can never be served another
//! token's identity (the failure mode of caches keyed by a short or attacker-steerable hash), and
//! the token itself is not kept. Entries expire at min(token `exp`, insertion + ttl); only tokens
//! that fully verified are inserted, so an attacker cannot fill the cache with junk.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use super::identity::Identity;

/// Power of two; a shard is picked by the digest's first byte.
const SHARDS: usize = 16;

/// SHA-256 of a token.
#[derive(Clone, Copy, PartialEq, Eq)]
struct TokenKey([u8; 32]);

impl Hash for TokenKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The digest is already uniform: 8 of its bytes are the hash (no SipHash pass needed).
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.0[8..16]);
        state.write_u64(u64::from_le_bytes(word));
    }
}

/// Passes a `write_u64` through; only [`TokenKey`] is ever hashed with it.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not reached for TokenKey; fold anyway so the type stays a correct Hasher.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

struct Entry {
    identity: Arc<Identity>,
    deadline: Instant,
}

type Shard = HashMap<TokenKey, Entry, BuildHasherDefault<PassThrough>>;

pub struct TokenCache {
    shards: Box<[RwLock<Shard>]>,
    per_shard: usize,
    ttl: Duration,
}

impl TokenCache {
    /// `max_entries == 0` disables caching.
    #[must_use]
    pub fn new(max_entries: usize, ttl: Duration) -> Self {
        let per_shard = max_entries.div_ceil(SHARDS);
        let shards = (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect();
        Self {
            shards,
            per_shard,
            ttl,
        }
    }

    fn key(token: &str) -> TokenKey {
        TokenKey(Sha256::digest(token.as_bytes()).into())
    }

    fn shard(&self, key: &TokenKey) -> &RwLock<Shard> {
        &self.shards[usize::from(key.0[0]) % SHARDS]
    }

    pub fn get(&self, token: &str) -> Option<Arc<Identity>> {
        if self.per_shard == 0 {
            return None;
        }
        let key = Self::key(token);
        // Poisoning only means a panic elsewhere while holding the lock; every write below
        // leaves the map consistent, so the data is still good.
        let shard = self
            .shard(&key)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = shard.get(&key)?;
        (Instant::now() < entry.deadline).then(|| Arc::clone(&entry.identity))
    }

    /// Caches a verified identity until min(`exp`, now + ttl).
    pub fn insert(&self, token: &str, identity: &Arc<Identity>, exp_unix: u64) {
        if self.per_shard == 0 {
            return;
        }
        let Some(lifetime) = cache_lifetime(SystemTime::now(), exp_unix, self.ttl) else {
            return;
        };
        let now = Instant::now();
        let key = Self::key(token);
        let mut shard = self
            .shard(&key)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= self.per_shard && !shard.contains_key(&key) {
            shard.retain(|_, e| e.deadline > now);
            if shard.len() >= self.per_shard {
                // Still full of live entries: drop one arbitrary entry (hash order is random
                // with respect to age), which bounds memory without an LRU list.
                if let Some(victim) = shard.keys().next().copied() {
                    shard.remove(&victim);
                }
            }
        }
        shard.insert(
            key,
            Entry {
                identity: Arc::clone(identity),
                deadline: now + lifetime,
            },
        );
    }

    pub fn clear(&self) {
        for shard in &self.shards {
            shard
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// How long a token verified at `now` may be served from cache; `None` if not at all.
fn cache_lifetime(now: SystemTime, exp_unix: u64, ttl: Duration) -> Option<Duration> {
    let exp = UNIX_EPOCH.checked_add(Duration::from_secs(exp_unix))?;
    // Sub-second precision: the entry must not outlive `exp` by the fraction of a second.
    let remaining = exp.duration_since(now).ok().filter(|r| !r.is_zero())?;
    Some(remaining.min(ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(subject: &str) -> Arc<Identity> {
        Arc::new(Identity {
            subject: subject.to_owned(),
            ..Identity::anonymous()
        })
    }

    fn far_future() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 3600
    }

    #[test]
    fn lifetime_is_min_of_exp_and_ttl() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let ttl = Duration::from_secs(60);
        assert_eq!(
            cache_lifetime(now, 1_030, ttl),
            Some(Duration::from_secs(30))
        );
        assert_eq!(cache_lifetime(now, 5_000, ttl), Some(ttl));
        assert_eq!(
            cache_lifetime(now + Duration::from_millis(400), 1_001, ttl),
            Some(Duration::from_millis(600))
        );
        // Expired (or only valid through leeway): never cached.
        assert_eq!(cache_lifetime(now, 1_000, ttl), None);
        assert_eq!(cache_lifetime(now, 990, ttl), None);
    }

    #[test]
    fn hit_miss_and_disabled() {
        let cache = TokenCache::new(100, Duration::from_secs(60));
        cache.insert("a.b.c", &ident("alice"), far_future());
        assert_eq!(
            cache.get("a.b.c").map(|i| i.subject.clone()),
            Some("alice".to_owned())
        );
        assert!(cache.get("a.b.d").is_none());
        cache.clear();
        assert!(cache.get("a.b.c").is_none());

        let off = TokenCache::new(0, Duration::from_secs(60));
        off.insert("a.b.c", &ident("alice"), far_future());
        assert!(off.get("a.b.c").is_none());
    }

    #[test]
    fn bounded() {
        let cache = TokenCache::new(32, Duration::from_secs(60));
        for i in 0..1_000 {
            cache.insert(&format!("token-{i}"), &ident("x"), far_future());
        }
        assert!(cache.len() <= 32, "{}", cache.len());
    }

    #[test]
    fn expired_entries_are_not_served() {
        let cache = TokenCache::new(10, Duration::from_millis(1));
        cache.insert("t", &ident("x"), far_future());
        std::thread::sleep(Duration::from_millis(5));
        assert!(cache.get("t").is_none());
    }
}
