//! C API of the moe kernels (being written).
