//! C API of the attention kernels (being written).
