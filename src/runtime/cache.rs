//! On-disk cubin cache.
//!
//! A file holds one compiled module and the full key it was compiled for; it is used only when the key
//! matches and its checksum is right. Anything else (truncated, corrupt, another key) is recompiled and
//! overwritten. Files are written to a temporary name and renamed, so a reader never sees a partial file.

use super::jit::CompiledModule;
use super::sources::fnv1a64;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Overrides the cache folder.
pub const CACHE_DIR_ENV: &str = "SPARKINFER_CACHE_DIR";
const MAGIC: &[u8; 8] = b"SPKCUBN1";

/// `$SPARKINFER_CACHE_DIR`, else `$XDG_CACHE_HOME/sparkinfer`, else `~/.cache/sparkinfer`.
pub fn cache_dir() -> Option<PathBuf> {
    let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = non_empty(CACHE_DIR_ENV) {
        return Some(d);
    }
    if let Some(d) = non_empty("XDG_CACHE_HOME") {
        return Some(d.join("sparkinfer"));
    }
    non_empty("HOME").map(|h| h.join(".cache").join("sparkinfer"))
}

/// Path of the cache file for `key` (`name` only makes the folder readable).
pub fn entry_path(dir: &Path, name: &str, key: &str) -> PathBuf {
    dir.join(format!("{name}-{:016x}.cubin", fnv1a64(&[key.as_bytes()])))
}

fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    buf.extend_from_slice(bytes);
}

fn encode(key: &str, module: &CompiledModule) -> Vec<u8> {
    let mut buf = Vec::with_capacity(module.cubin.len() + 256);
    buf.extend_from_slice(MAGIC);
    put_bytes(&mut buf, key.as_bytes());
    buf.extend_from_slice(&(module.lowered_names.len() as u64).to_le_bytes());
    for (expr, lowered) in &module.lowered_names {
        put_bytes(&mut buf, expr.as_bytes());
        put_bytes(&mut buf, lowered.as_bytes());
    }
    put_bytes(&mut buf, &module.cubin);
    let checksum = fnv1a64(&[&buf]);
    buf.extend_from_slice(&checksum.to_le_bytes());
    buf
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

/// Decodes a cache file; None when it is not a valid entry for exactly `key`.
pub fn decode(data: &[u8], key: &str) -> Option<CompiledModule> {
    if data.len() < MAGIC.len() + 8 || &data[..MAGIC.len()] != MAGIC {
        return None;
    }
    let (body, tail) = data.split_at(data.len() - 8);
    if fnv1a64(&[body]) != u64::from_le_bytes(tail.try_into().ok()?) {
        return None;
    }
    let mut r = Reader { data: body, pos: MAGIC.len() };
    if r.bytes()? != key.as_bytes() {
        return None;
    }
    let count = usize::try_from(r.u64()?).ok()?;
    let mut lowered_names = Vec::new();
    for _ in 0..count.min(1 << 16) {
        lowered_names.push((r.string()?, r.string()?));
    }
    let cubin = r.bytes()?.to_vec();
    if r.pos != body.len() || cubin.is_empty() {
        return None;
    }
    Some(CompiledModule { cubin, lowered_names, log: String::new() })
}

pub fn load(path: &Path, key: &str) -> Option<CompiledModule> {
    decode(&std::fs::read(path).ok()?, key)
}

/// Writes the entry atomically. Failures are reported to the caller, which may ignore them: the cache
/// is an optimisation, never a requirement.
pub fn store(path: &Path, key: &str, module: &CompiledModule) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().ok_or_else(|| std::io::Error::other("cache path has no folder"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&encode(key, module))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module() -> CompiledModule {
        CompiledModule {
            cubin: vec![1, 2, 3, 4, 5, 6, 7],
            lowered_names: vec![("k<1>".into(), "_Z1kILi1EEvv".into())],
            log: String::new(),
        }
    }

    #[test]
    fn round_trips_and_rejects_corruption() {
        let dir = std::env::temp_dir().join(format!("spk-cache-test-{}", std::process::id()));
        let path = entry_path(&dir, "k", "key-a");
        store(&path, "key-a", &module()).unwrap();
        assert_eq!(load(&path, "key-a"), Some(module()));
        // Another key stored under a colliding name is never returned for this key.
        assert_eq!(load(&path, "key-b"), None);

        let mut bytes = std::fs::read(&path).unwrap();
        for i in [0, 9, bytes.len() / 2, bytes.len() - 1] {
            let saved = bytes[i];
            bytes[i] ^= 0x5a;
            assert_eq!(decode(&bytes, "key-a"), None, "flipped byte {i} accepted");
            bytes[i] = saved;
        }
        for len in [0, 5, bytes.len() - 1] {
            assert_eq!(decode(&bytes[..len], "key-a"), None, "truncated to {len} accepted");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
