//! Owned device buffers and event timers: utilities for the CLI, the benchmarks and the GPU tests.
//! Ops never use them: they work on caller memory.

use super::device::Device;
use crate::error::{CudaContextExt, Result};
use crate::ops::Stream;
use cudarc::driver::sys;

/// A device allocation freed on drop.
pub struct DeviceBuffer<'a> {
    device: &'a Device,
    ptr: u64,
    bytes: usize,
}

impl<'a> DeviceBuffer<'a> {
    pub fn new(device: &'a Device, bytes: usize) -> Result<Self> {
        Ok(DeviceBuffer { device, ptr: device.alloc(bytes)?, bytes })
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice<T: Copy>(device: &'a Device, data: &[T]) -> Result<Self> {
        let b = Self::new(device, std::mem::size_of_val(data))?;
        b.upload(data)?;
        Ok(b)
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Copies `data` to the start of the buffer.
    pub fn upload<T: Copy>(&self, data: &[T]) -> Result<()> {
        let n = std::mem::size_of_val(data);
        assert!(n <= self.bytes, "upload of {n} bytes into a buffer of {}", self.bytes);
        unsafe { self.device.copy(self.ptr, data.as_ptr() as u64, n) }
    }

    /// Copies the first `len` elements back to the host.
    pub fn download<T: Copy + Default>(&self, len: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); len];
        let n = std::mem::size_of_val(out.as_slice());
        assert!(n <= self.bytes, "download of {n} bytes from a buffer of {}", self.bytes);
        unsafe { self.device.copy(out.as_mut_ptr() as u64, self.ptr, n)? };
        Ok(out)
    }

    /// Fills every byte with 0xFF: NaN in bf16 and fp32, so an unwritten output element is caught.
    pub fn poison(&self) -> Result<()> {
        unsafe { self.device.fill(self.ptr, 0xff, self.bytes) }
    }
}

impl Drop for DeviceBuffer<'_> {
    fn drop(&mut self) {
        let _ = unsafe { self.device.free(self.ptr) };
    }
}

/// A pair of CUDA events measuring device time between two points of a stream.
pub struct EventTimer {
    start: sys::CUevent,
    stop: sys::CUevent,
}

impl EventTimer {
    pub fn new(device: &Device) -> Result<Self> {
        device.bind()?;
        let mut start = std::ptr::null_mut();
        let mut stop = std::ptr::null_mut();
        unsafe {
            sys::cuEventCreate(&mut start, 0).result().during("cuEventCreate")?;
            sys::cuEventCreate(&mut stop, 0).result().during("cuEventCreate")?;
        }
        Ok(EventTimer { start, stop })
    }

    pub fn start(&self, stream: Stream) -> Result<()> {
        unsafe { sys::cuEventRecord(self.start, stream.raw()) }.result().during("cuEventRecord")
    }

    pub fn stop(&self, stream: Stream) -> Result<()> {
        unsafe { sys::cuEventRecord(self.stop, stream.raw()) }.result().during("cuEventRecord")
    }

    /// Waits for the stop event and returns the elapsed time in microseconds.
    pub fn elapsed_us(&self) -> Result<f64> {
        let mut ms = 0f32;
        unsafe {
            sys::cuEventSynchronize(self.stop).result().during("cuEventSynchronize")?;
            sys::cuEventElapsedTime_v2(&mut ms, self.start, self.stop).result().during("cuEventElapsedTime")?;
        }
        Ok(ms as f64 * 1000.0)
    }
}

impl Drop for EventTimer {
    fn drop(&mut self) {
        unsafe {
            sys::cuEventDestroy_v2(self.start);
            sys::cuEventDestroy_v2(self.stop);
        }
    }
}
