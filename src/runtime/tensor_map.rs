//! Tensor maps (`CUtensorMap`): the descriptors through which a kernel's TMA copies
//! (`cp.async.bulk.tensor`) address a tensor in global memory. The driver encodes them on the host, which
//! is cheap and needs no device work; a kernel receives them inside its `const __grid_constant__`
//! parameter struct. They hold device addresses and sizes only, so a captured graph replays them as they
//! were encoded.

use super::Device;
use crate::error::{Error, Result, Status};
use cudarc::driver::sys;

/// A tensor map as a kernel parameter: 128 opaque bytes, 64-byte aligned as the driver requires
/// (`TensorMap` in csrc/common/async.cuh).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMap([u64; 16]);

impl TensorMap {
    /// The parameter of a kernel that does not use its map.
    pub const NONE: TensorMap = TensorMap([0; 16]);
}

/// Byte strides of a tensor map are multiples of 16 below this.
pub(crate) const MAX_STRIDE_BYTES: u64 = 1 << 40;
/// Dimensions of a tensor map hold 1 to this many elements.
const MAX_DIM: u64 = 1 << 32;
/// Box dimensions hold 1 to this many elements.
const MAX_BOX_DIM: u32 = 256;
/// Bytes the 128-byte swizzle allows in the box's innermost dimension.
const SWIZZLE_SPAN: u32 = 128;

/// A 5-d bf16 tensor read in boxes that land in shared memory with the 128-byte swizzle
/// (`CU_TENSOR_MAP_SWIZZLE_128B`); elements outside the tensor read as zeros. Sizes are in elements and
/// innermost first; dimension 0 is contiguous, `strides` are the byte strides of dimensions 1 to 4.
#[derive(Clone, Copy, Debug)]
pub struct Bf16Tiled5d {
    pub address: u64,
    pub dims: [u64; 5],
    pub strides: [u64; 4],
    pub boxes: [u32; 5],
}

impl Bf16Tiled5d {
    /// The first rule of cuTensorMapEncodeTiled (CUDA driver API, "Tensor Map Object Management") this
    /// tensor breaks, if any; the ops check their arguments against the same rules first and name them,
    /// this guards the encoding itself.
    fn broken_rule(&self) -> Option<String> {
        if self.address == 0 || !self.address.is_multiple_of(16) {
            return Some(format!("address {:#x} is not a non-NULL multiple of 16", self.address));
        }
        if let Some(d) = self.dims.iter().find(|&&d| d == 0 || d > MAX_DIM) {
            return Some(format!("dimension {d} is outside 1 to 2^32"));
        }
        if let Some(s) = self.strides.iter().find(|&&s| !s.is_multiple_of(16) || s >= MAX_STRIDE_BYTES) {
            return Some(format!("byte stride {s} is not a multiple of 16 below 2^40"));
        }
        if let Some(b) = self.boxes.iter().find(|&&b| b == 0 || b > MAX_BOX_DIM) {
            return Some(format!("box dimension {b} is outside 1 to 256"));
        }
        let inner = self.boxes[0] * 2;
        if !inner.is_multiple_of(16) || inner > SWIZZLE_SPAN {
            return Some(format!("the box's inner {inner} bytes are not a multiple of 16 up to the 128-byte swizzle"));
        }
        None
    }

    /// Encodes the map; `what` names the argument the tensor comes from in errors.
    pub fn encode(&self, device: &Device, what: &str) -> Result<TensorMap> {
        if let Some(rule) = self.broken_rule() {
            return Err(Error::invalid(format!("{what}: no tensor map can describe it: {rule}")));
        }
        device.bind()?;
        let mut map = sys::CUtensorMap { opaque: [0; 16] };
        let element_strides = [1u32; 5];
        let rc = unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                5,
                self.address as *mut std::ffi::c_void,
                self.dims.as_ptr(),
                self.strides.as_ptr(),
                self.boxes.as_ptr(),
                element_strides.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                // Rows are read whole and neighbouring rows by neighbouring CTAs: fill L2 in 256-byte pieces.
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                // Out-of-bounds elements read as zeros, not NaN.
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        rc.result().map_err(|e| {
            let invalid = e.0 == sys::cudaError_enum::CUDA_ERROR_INVALID_VALUE;
            let e = Error::from(e);
            let message = format!(
                "{what}: cuTensorMapEncodeTiled refused the map (address {:#x}, dims {:?}, byte strides {:?}, box \
                 {:?}): {}",
                self.address, self.dims, self.strides, self.boxes, e.message
            );
            Error::new(if invalid { Status::InvalidArgument } else { e.status }, message)
        })?;
        Ok(TensorMap(map.opaque))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Bf16Tiled5d {
        Bf16Tiled5d {
            address: 1 << 30,
            dims: [64, 4096, 4, 2, 8],
            strides: [1024, 128, 512, 4096 * 1024],
            boxes: [64, 16, 4, 1, 1],
        }
    }

    #[test]
    fn the_parameter_is_128_bytes_aligned_to_64() {
        assert_eq!(std::mem::size_of::<TensorMap>(), 128);
        assert_eq!(std::mem::align_of::<TensorMap>(), 64);
        assert_eq!(std::mem::size_of::<sys::CUtensorMap>(), 128);
    }

    #[test]
    fn each_encoding_rule_is_checked_before_the_driver() {
        assert_eq!(valid().broken_rule(), None);
        let cases: [fn(&mut Bf16Tiled5d); 8] = [
            |t| t.address += 8,
            |t| t.address = 0,
            |t| t.dims[4] = 0,
            |t| t.dims[1] = MAX_DIM + 1,
            |t| t.strides[3] = MAX_STRIDE_BYTES,
            |t| t.strides[0] = 1000,
            |t| t.boxes[1] = 257,
            |t| t.boxes[0] = 128,
        ];
        for (i, breaks) in cases.iter().enumerate() {
            let mut t = valid();
            breaks(&mut t);
            assert!(t.broken_rule().is_some(), "case {i}: {t:?}");
        }
    }
}
