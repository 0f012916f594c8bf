//! The disk cache on a real device: a first context compiles and writes its cubins, a corrupted entry
//! is recompiled (never trusted) and rewritten. Its own test binary because it sets the cache folder
//! through the environment.

use sparkinfer::checks::foundation::{check_rmsnorm, RmsNormCase};
use sparkinfer::ops::{Context, Stream};
use sparkinfer::reference::rmsnorm::WeightStyle;
use sparkinfer::testing::BF16_TOL;

#[test]
#[ignore = "needs a CUDA GPU"]
fn corrupt_cache_entries_are_recompiled() {
    let dir = std::env::temp_dir().join(format!("sparkinfer-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::env::set_var("SPARKINFER_CACHE_DIR", &dir);
    let case = RmsNormCase { rows: 2, dim: 2048, style: WeightStyle::Plain, residual: true, pad: 0, in_place: false };

    {
        let ctx = Context::new(0).unwrap();
        assert!(check_rmsnorm(&ctx, Stream::NULL, &case, 1).unwrap().passes(BF16_TOL));
    }
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(entries.len(), 1, "one cubin written: {entries:?}");
    let path = &entries[0];
    let good = std::fs::read(path).unwrap();

    // Flip bytes in the middle of the cubin: the checksum must reject it and the kernel must still run.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..mid + 64] {
        *b ^= 0xa5;
    }
    std::fs::write(path, &bad).unwrap();
    {
        let ctx = Context::new(0).unwrap();
        assert!(check_rmsnorm(&ctx, Stream::NULL, &case, 2).unwrap().passes(BF16_TOL));
    }
    assert_eq!(std::fs::read(path).unwrap(), good, "the corrupt entry was rewritten with the recompiled cubin");

    // A truncated file likewise.
    std::fs::write(path, &good[..good.len() / 3]).unwrap();
    {
        let ctx = Context::new(0).unwrap();
        assert!(check_rmsnorm(&ctx, Stream::NULL, &case, 3).unwrap().passes(BF16_TOL));
    }
    assert_eq!(std::fs::read(path).unwrap(), good);
    std::fs::remove_dir_all(&dir).unwrap();
}
