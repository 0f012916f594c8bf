//! CPU reference of the moe kernels (being written).
