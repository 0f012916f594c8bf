//! Strided row-major matrices as ops see them: an address, a shape and a row stride in elements.

use crate::error::{Error, Result};
use crate::reference::bf16;

/// A read-only row-major matrix of `rows × cols` elements of `elem_bytes` each.
#[derive(Clone, Copy, Debug)]
pub struct Matrix {
    pub ptr: u64,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub elem_bytes: usize,
}

/// A writable matrix; same layout as [`Matrix`].
#[derive(Clone, Copy, Debug)]
pub struct MatrixMut(pub Matrix);

impl Matrix {
    /// Builds a matrix, resolving a row stride of 0 to `cols` and checking that the stride covers a row,
    /// keeps rows aligned to `align_elems` and that the extent fits in the address space.
    pub fn new(
        name: &str,
        ptr: u64,
        rows: usize,
        cols: usize,
        row_stride: i64,
        elem_bytes: usize,
        align_elems: usize,
    ) -> Result<Matrix> {
        if row_stride < 0 {
            return Err(Error::invalid(format!("{name}: row stride {row_stride} is negative")));
        }
        let row_stride = if row_stride == 0 { cols } else { row_stride as usize };
        if row_stride < cols {
            return Err(Error::invalid(format!(
                "{name}: row stride {row_stride} is smaller than the row length {cols}"
            )));
        }
        if row_stride % align_elems != 0 {
            return Err(Error::invalid(format!(
                "{name}: row stride {row_stride} must be a multiple of {align_elems} elements for aligned vector access"
            )));
        }
        let m = Matrix { ptr, rows, cols, row_stride, elem_bytes };
        let bytes = m.extent_bytes().ok_or_else(|| Error::invalid(format!("{name}: size overflows")))?;
        if ptr.checked_add(bytes).is_none() {
            return Err(Error::invalid(format!("{name}: {bytes} bytes from {ptr:#x} overflow the address space")));
        }
        Ok(m)
    }

    /// Bytes from the first element to one past the last: `((rows − 1) · stride + cols) · elem`.
    pub fn extent_bytes(&self) -> Option<u64> {
        let elems = (self.rows.checked_sub(1)?).checked_mul(self.row_stride)?.checked_add(self.cols)?;
        (elems as u64).checked_mul(self.elem_bytes as u64)
    }

    fn extent(&self) -> u64 {
        self.extent_bytes().expect("extent checked at construction")
    }

    /// Copies the rows of a host bf16 matrix into a contiguous vector (CPU backend).
    ///
    /// # Safety
    /// `ptr` must be a valid host pointer for the matrix's extent.
    pub unsafe fn read_host_bf16(&self) -> Vec<bf16> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            let row = (self.ptr as *const bf16).add(r * self.row_stride);
            out.extend_from_slice(std::slice::from_raw_parts(row, self.cols));
        }
        out
    }

    /// True when the two matrices' byte ranges overlap.
    pub fn overlaps(&self, other: &Matrix) -> bool {
        super::overlaps(self.ptr, self.extent(), other.ptr, other.extent())
    }

    /// Same start, shape and stride.
    pub fn same_as(&self, other: &Matrix) -> bool {
        self.ptr == other.ptr
            && self.rows == other.rows
            && self.cols == other.cols
            && self.row_stride == other.row_stride
    }

    /// Checks that the device can access the whole extent (CUDA backend).
    pub fn check_on_device(&self, device: &crate::runtime::Device, name: &str) -> Result<()> {
        device.check_buffer(name, self.ptr, self.extent())
    }
}

impl MatrixMut {
    /// Writes contiguous rows into a host matrix (CPU backend).
    ///
    /// # Safety
    /// `ptr` must be a valid, writable host pointer for the matrix's extent.
    pub unsafe fn write_host<T: Copy>(&self, data: &[T]) {
        let m = &self.0;
        debug_assert_eq!(std::mem::size_of::<T>(), m.elem_bytes);
        for r in 0..m.rows {
            let row = (m.ptr as *mut T).add(r * m.row_stride);
            std::ptr::copy_nonoverlapping(data.as_ptr().add(r * m.cols), row, m.cols);
        }
    }
}
