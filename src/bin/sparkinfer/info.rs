//! `sparkinfer info`.

use crate::Options;
use sparkinfer::runtime::{cache, device, libs, Device};

pub fn run(_: &Options) -> Result<(), String> {
    println!("sparkinfer {} (ABI {})", sparkinfer::VERSION, sparkinfer::ABI_VERSION);
    match libs::driver_version() {
        Ok(v) => println!("CUDA driver: found, API version {}.{}", v / 1000, (v % 1000) / 10),
        Err(e) => println!("CUDA driver: not usable: {}", e.message),
    }
    match libs::require_nvrtc() {
        Ok((major, minor)) => println!("NVRTC: found, version {major}.{minor}"),
        Err(e) => println!("NVRTC: not usable: {}", e.message),
    }
    match device::device_count() {
        Ok(n) => {
            println!("CUDA devices: {n}");
            for i in 0..n {
                match Device::new(i) {
                    Ok(d) => {
                        let info = &d.info;
                        println!(
                            "  [{i}] {} ({}), {} SMs, {:.1} GiB, L2 {:.0} MiB, shared memory: {} KiB/block, {} KiB/SM",
                            info.name,
                            info.arch(),
                            info.sm_count,
                            info.total_memory as f64 / (1u64 << 30) as f64,
                            info.l2_bytes as f64 / (1u64 << 20) as f64,
                            info.max_shared_per_block_optin / 1024,
                            info.max_shared_per_sm / 1024
                        );
                    }
                    Err(e) => println!("  [{i}] not usable: {e}"),
                }
            }
        }
        Err(e) => println!("CUDA devices: none ({})", e.message),
    }
    match cache::cache_dir() {
        Some(d) => println!("kernel cache: {} (set {} to move it)", d.display(), cache::CACHE_DIR_ENV),
        None => println!("kernel cache: off (no {}, XDG_CACHE_HOME or HOME)", cache::CACHE_DIR_ENV),
    }
    Ok(())
}
