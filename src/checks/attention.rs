//! Checks of the attention kernels (being written).

use super::ModelCheck;

pub fn model_checks(_cpu: bool) -> Vec<ModelCheck> {
    Vec::new()
}
