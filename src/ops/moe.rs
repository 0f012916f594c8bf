//! moe kernels (being written).

use crate::runtime::sources::KernelSource;

pub fn kernel_sources() -> Vec<&'static KernelSource> {
    Vec::new()
}
