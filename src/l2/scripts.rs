//! The Lua scripts: each runs atomically in Redis (no other command runs
//! between its steps), which is what the lease, the fencing and
//! compare-and-delete need.

use std::sync::LazyLock;

use redis::Script;

/// KEYS: lease, fence, token, app fence. ARGV: value, ttl ms. The lease
/// (`SET NX PX`), the key's and its app's invalidation counts when taken
/// (`key/app`), and the token held then (empty if none: the previous holder
/// may have written it after the caller looked); nil when another holds
/// the lease.
pub(super) static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local fence = (redis.call('GET', KEYS[2]) or '0') .. '/' .. (redis.call('GET', KEYS[4]) or '0')
  return {fence, redis.call('HGET', KEYS[3], 'v') or ''}
end
return false
",
    )
});

/// KEYS: lease. ARGV: value, ttl ms. Extends the lease while its holder
/// still holds it (a holder minting past the lease's first life). 1 or 0.
pub(super) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
",
    )
});

/// KEYS: token, lease, fence, app fence. ARGV: lease value, fence, issue
/// time ms, sealed value, ttl ms. Writes only while the lease is still
/// this holder's, neither the key nor its app was invalidated since it was
/// taken, and no token asked for later is held; releases the lease. 1
/// written, 0 lease lost, -1 invalidated since, -2 a newer token is held.
pub(super) static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
local fence = (redis.call('GET', KEYS[3]) or '0') .. '/' .. (redis.call('GET', KEYS[4]) or '0')
if fence ~= ARGV[2] then return -1 end
local held = redis.call('HGET', KEYS[1], 'i')
if held and tonumber(held) >= tonumber(ARGV[3]) then return -2 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'i', ARGV[3], 'v', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
",
    )
});

/// KEYS: token, fence. ARGV: fence ttl ms. Drops the token and raises the
/// invalidation count.
pub(super) static INVALIDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('DEL', KEYS[1])
local n = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return n
",
    )
});

/// KEYS: token. ARGV: a sealed value that did not open. Drops the entry if
/// it still holds that value (so a fresh token can take its place).
pub(super) static DROP_GARBAGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'v') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// KEYS: lease. ARGV: value. Compare-and-delete.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// KEYS: a token's holder record. ARGV: caller tag, 1 if served to others
/// too, ttl ms. The first caller, and whether any other was served it.
pub(super) static SERVED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local owner = redis.call('HGET', KEYS[1], 'o')
if not owner then
  redis.call('HSET', KEYS[1], 'o', ARGV[1])
elseif owner ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 's', '1')
end
if ARGV[2] == '1' then redis.call('HSET', KEYS[1], 's', '1') end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
",
    )
});

/// KEYS: an invalidation count. ARGV: ttl ms. Raises it.
pub(super) static RAISE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return n
",
    )
});

/// KEYS: key set, its lock. ARGV: version, sealed set, lock value.
/// Written only by the lock's holder, and only over an older version
/// (never an older or the same one). 1 written, 0 not, -1 the lock is lost.
pub(super) static PUT_KEY_SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return -1 end
local held = redis.call('HGET', KEYS[1], 'ver')
if held and tonumber(held) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'ver', ARGV[1], 'v', ARGV[2])
return 1
",
    )
});
