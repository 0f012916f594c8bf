//! CPU reference of the attention kernels (being written).
